"""What the app says to people: short explanations per tab and the terms a visitor meets."""

from __future__ import annotations

__all__ = ["ADD_WEIGHTS", "GLOSSARY", "HOW_TO_READ", "INTRO", "SA_NET_URL", "intro", "term"]

SA_NET_URL = "https://github.com/wofmanaf/SA-Net"  # its README's table links the released weights
TORCHVISION_URL = "https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet50.html"

# For operators, in a collapsed section (the README's "Weights" section says the same at length).
ADD_WEIGHTS = (
    "Put `resnet50-0676ba61.pth` (torchvision's IMAGENET1K_V1, downloaded automatically when the server "
    "is online) and `sa_resnet50.pth.tar` (the SA-Net release, BaiduDrive share code 474p, linked from "
    f"[the SA-Net repository]({SA_NET_URL})) in the `weights/` folder, or start the app with "
    "`--resnet50 SPEC` / `--sanet50 SPEC` (a path, an http(s) URL or `hf://owner/repo/file`), then restart it. "
    "`python -m sanet_viz weights` shows what the server finds. SE-ResNet50 and ECA-ResNet50d download timm's "
    "weights from Hugging Face when the server is online (or `--seresnet50 SPEC` / `--ecaresnet50d SPEC`); "
    "`--models` limits what the app offers.")

INTRO = ("Upload a photo. Two networks classify it: **ResNet50** and **SANet50**, the same network with "
         "*Shuffle Attention* (SA-Net, ICASSP 2021) in every block. The heatmaps show where each one looks; "
         "the other tabs open up SANet50's attention.")

PICK_MORE = (" Above the heatmaps you can pick other models: SANet50 beside the channel attention its paper "
             "compares it with (**SE**-ResNet50, **ECA**-ResNet50d), or any two of them.")


def intro(offered: int) -> str:
    """The page's introduction; with more than two models offered, a word on the pickers."""
    return INTRO + (PICK_MORE if offered > 2 else "")


# Term -> one-sentence definition (tooltips, and the glossary under "How to read this").
GLOSSARY: dict[str, str] = {
    "SA_5_3": "The last Shuffle Attention module of SANet50: stage 5, block 3 (layer4.2 in code).",
    "SA group": "SA splits the 2048 channels into 64 groups of 32; each group has a channel gate (on one "
                "half) and a spatial gate (on the other half).",
    "chunk": "32 consecutive channels of the block's output. After SA's channel shuffle, chunk k holds half-"
             "groups of two different SA groups, so chunk k is not SA group k.",
    "gate": "A number between 0 (closed) and 1 (open) that SA multiplies a channel by: per channel for the "
            "channel gate, per pixel for the spatial gate.",
    "probe": "The paper's test of one chunk: mask the input with the chunk's map and see how much of the "
             "predicted class's probability survives.",
    "Grad-CAM": "A heatmap of where the class score is most sensitive, from the last block's features and "
                "their gradients.",
    "centre crop": "Both models see the 224 x 224 pixel square in the middle of the photo (resized so its "
                   "short side is 256 pixels), not the whole photo.",
}


def term(name: str) -> str:
    """HTML for a term with its definition on hover (and in the glossary for touch screens)."""
    return f'<abbr title="{GLOSSARY[name]}">{name}</abbr>'


HOW_TO_READ: dict[str, str] = {
    "compare": (
        "- **Heatmaps**: red is where the explanation is strongest, blue where it is weakest. Each map is "
        "scaled to its own maximum (1 = its strongest point), so compare *where* the models look, not how "
        "strongly.\n"
        "- **Difference**: the right model's map minus the left one's (SANet50's minus ResNet50's by default): "
        "red where the right model looks more, blue where the left one does.\n"
        "- The models see only the **centre crop** of the photo; switch *View* to see it in place.\n"
        "- **Score-CAM / Ablation-CAM** run one forward pass per channel (2048): they take minutes here; "
        "you can cancel them. **EigenCAM** ignores the class you choose.\n"
        "- Untrained weights give heatmaps of random features: they show how the tool works, not what "
        "the networks learned."),
    "groups": (
        "- SA_5_3's output has 2048 channels. Chunk *k* = channels 32k ... 32k+31; its mean over the "
        "channels is the *group map* (the small pictures).\n"
        "- **Probe**: the input is multiplied by chunk *k*'s map, and the bar shows the probability the "
        "model still gives to the class it predicted for the whole image. The dashed line is that "
        "probability without a mask. A bar near or above it means the chunk keeps what the model needs.\n"
        "- Blue bars (even *k*) hold channel-branch halves, orange bars (odd *k*) spatial-branch halves "
        "of SA groups *k*/2 and 32 + *k*/2: the channel shuffle interleaves them.\n"
        "- The right model is always probed; tick the box for the left one too. A model without SA (ResNet50, "
        "SE-ResNet50, ECA-ResNet50d) has grey bars: its chunks are just consecutive channels, with no branches.\n"
        "- Hover a bar for its value; click a bar or a map to open that chunk."),
    "depth": (
        "- One row per SA module from SA_2_1 (early) to SA_5_3 (last), one column per SA group: how far "
        "each gate is open for this image, averaged over the group's channels (and pixels).\n"
        "- The paper finds early gates similar across classes and late gates class-specific.\n"
        "- With untrained SANet50 every gate is sigmoid(1) = 0.731: the picture is flat, and that says "
        "nothing about SA.\n"
        "- **SE** and **ECA** (picked above the heatmaps) have one gate per channel (256 to 2048 per module), "
        "not per group: their chart shows, module by module, how the gates spread over the channels. With two "
        "gated models, the second chart puts both on one axis of depth, each in its own unit."),
    "faithfulness": (
        "A heatmap invites belief; these numbers test it, for each model's map as shown (same class).\n"
        "- **Deletion** (lower area = more faithful): pixels are removed most important first (set to the "
        "mean colour); if the map points at what the model uses, its score collapses early.\n"
        "- **Insertion** (higher area = more faithful): pixels are put back, most important first, into a "
        "blurred copy. It says little when the blurred copy alone is already recognised.\n"
        "- **ROAD** (higher = more faithful): removed pixels are filled in from their neighbours, which "
        "avoids the odd colours of deletion; the difference between removing the least and the most "
        "important pixels.\n"
        "- **Randomisation check**: the model is destroyed one block at a time, from the classifier down, and "
        "the map recomputed. A faithful map changes (its similarity falls); **a map that does not change when "
        "the model is destroyed explains nothing** (it shows the picture, not the model).\n"
        "- One image is an anecdote: `reproduce --faithfulness` gives confidence intervals over a data set. "
        "With untrained weights these numbers describe random networks and favour no map."),
    "correlation": (
        "- For each SA module, each class's average gate profile (64 channel + 64 spatial gates) is "
        "compared with every other class's (Pearson r). For SE and ECA the profile is the gate of every "
        "channel; every gated model of the pair is correlated on the same images and labels.\n"
        "- High r at a depth: classes use SA's groups alike there. The paper: high early, lower late.\n"
        "- A correlation of a constant profile is **undefined**: such depths are greyed, with the reason, "
        "never drawn as a number. Untrained SANet50 gives constant profiles everywhere."),
}
