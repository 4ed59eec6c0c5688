"""The page's look: system fonts only (the page must load with no internet), and CSS for the
heatmaps side by side on a phone, the charts' hit areas, badges and colour bars."""

from __future__ import annotations

import gradio as gr

__all__ = ["THEME", "CSS", "CLICK_JS", "SCROLL_JS"]

THEME = gr.themes.Default(font=["system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])

CSS = """
.banner {border-radius:8px; padding:8px 12px; font-size:0.95em;}
.banner p {margin:0;}
.banner-untrained {background:#fff4e5; border-left:5px solid #b00020;}
.banner-pretrained {background:#e8f5e9; border-left:5px solid #2e7d32;}
.badge-untrained {background:#b00020; color:#fff; border-radius:4px; padding:0 5px; font-size:0.72em;
  margin-right:6px; text-transform:uppercase; font-weight:600; letter-spacing:0.03em; vertical-align:middle;}
.top5 .headline {font-size:1.1em; margin:2px 0 4px;}
.top5 ol {list-style:none; padding:0; margin:0;}
.top5 li {position:relative; display:flex; justify-content:space-between; gap:6px; font-size:0.85em;
  padding:1px 4px; margin:1px 0;}
.top5 .bar {position:absolute; left:0; top:0; bottom:0; background:#dbe9f6; border-radius:2px;}
.top5 .name, .top5 .prob {position:relative;}
.top5 .name {overflow:hidden; text-overflow:ellipsis; white-space:nowrap;}
.caption {font-size:0.85em; color:#444; margin-top:2px;}
.colorbar {margin:4px 0 2px;}
.colorbar-strip {height:10px; border-radius:3px;}
.colorbar-ends {display:flex; justify-content:space-between; font-size:0.78em; color:#555; gap:8px;}
.status {padding:6px 10px; border-radius:6px; font-size:0.92em;}
.status-busy {background:#fff8e1;}
.status-stale {background:#eeeeee; color:#555;}
.status-error {background:#fdecea;}
.placeholder {color:#666; font-size:0.9em; padding:8px;}
.chart {position:relative; max-width:760px; margin:0 auto;}
.chart img {width:100%; height:auto; display:block;}
.chart .hit {position:absolute; cursor:pointer; box-sizing:border-box;}
.chart .hit:hover {outline:2px solid rgba(0,0,0,0.55);}
.chart .hit.sel {outline:2px solid #000; z-index:1;}
.probe-chart .hit.sel {outline:1px dashed #555;}
.chart .tick, .chart .title, .chart .legend, .chart .ref, .chart .axis {position:absolute; white-space:nowrap;
  pointer-events:none; font-size:12px; line-height:1.2; color:#555;}
.chart .title {font-size:14px; color:#222;}
.chart .legend {font-size:11.5px;}
.chart .ref {color:#000;}
.group-grid {max-width:600px;}
.group-grid .k {position:absolute; left:2px; top:1px; font-size:11px; line-height:14px; color:#fff;
  background:rgba(0,0,0,0.55); padding:0 3px; border-radius:3px;}
abbr[title] {text-decoration:underline dotted; cursor:help;}
#swap-models {align-self:center; max-height:44px;}
.pair-note {font-size:0.88em; color:#444; background:#f3f6fa; border-radius:6px; padding:6px 10px;}
@media (max-width: 700px) {
  /* Both heatmaps side by side at half width on a phone. */
  #overlay-row {flex-wrap:nowrap !important; gap:6px !important;}
  #overlay-row > * {min-width:0 !important; flex:1 1 0 !important;}
  #overlay-row .top5 li {font-size:0.75em;}
  /* The pickers wrap (left and swap, then right): a model's name and "(untrained)" stay readable. */
  #model-pickers > *:not(#swap-models) {min-width:calc(100% - 64px) !important;}
  .top5 .headline {font-size:0.95em; overflow-wrap:anywhere;}
  .chart .title {font-size:12.5px;} .chart .tick, .chart .axis {font-size:10.5px;} .chart .legend {font-size:10px;}
  .probe-chart img {height:calc(var(--panels, 1) * 240px);}
  #page-title h2 {font-size:1.25em; margin-bottom:4px;}
  #page-title p {font-size:0.88em;}
  .banner {font-size:0.88em;}
}
"""

# For gr.HTML charts: a click on a hit area reports its group number (evt.group in Python).
CLICK_JS = ("element.addEventListener('click', (e) => { const hit = e.target.closest('[data-group]'); "
            "if (hit) { trigger('click', {group: Number(hit.dataset.group)}); } });")

# After Analyse on a phone, bring the results into view (the controls sit above them there). It
# runs before the call and passes the inputs through unchanged.
SCROLL_JS = ("(...args) => { if (window.innerWidth < 700) { const r = document.getElementById('results'); "
             "if (r) { setTimeout(() => r.scrollIntoView({behavior: 'smooth', block: 'start'}), 50); } } "
             "return args; }")
