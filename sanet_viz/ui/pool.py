"""The models the app offers (:class:`ModelPool`): the pair a visitor starts with is loaded at
start; every other offered model is loaded the first time a visitor picks it, one load at a time.
At most ``max_loaded`` stay loaded: a load beyond that first unloads the model used least
recently, outside the pair being loaded for (each model is about 0.2 GB: four loaded went past
the 2 GB budget); an unloaded model loads again when picked again.

Visitors read the loaded models from a snapshot that is replaced, never changed, when a model is
added or unloaded (copy-on-write): a request that iterates it never sees it change under it, and
a model unloaded while a request still uses it lives until that request ends.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..lab import Lab, LoadedModel
from ..weights import MODEL_SPECS, parse_model_keys

__all__ = ["ModelPool", "Expected", "PairError"]

log = logging.getLogger("sanet-viz")


class PairError(ValueError):
    """A pair of models the app cannot compare (unknown, not offered, or one model twice)."""


@dataclass(frozen=True)
class Expected:
    """What a model not loaded yet will run with, as far as is known before loading it."""

    pretrained: bool
    note: str  # where its weights come from, or why there are none


class ModelPool:
    """The offered models by key, in order; the first two are the starting pair."""

    def __init__(self, offered: Sequence[str], loaded: Mapping[str, LoadedModel], *,
                 loader: Callable[[str], LoadedModel] | None = None,
                 expected: Mapping[str, Expected] | None = None, max_loaded: int | None = None,
                 release: Callable[[], object] | None = None) -> None:
        if max_loaded is not None and max_loaded < 2:
            raise ValueError(f"at least two models must stay loaded (a pair), got {max_loaded}")
        self.offered = tuple(offered)
        if len(self.offered) < 2 or len(set(self.offered)) != len(self.offered):
            raise ValueError(f"the app offers at least two different models, got {', '.join(self.offered)}")
        missing = [k for k in self.offered[:2] if k not in loaded]
        if missing or (loader is None and any(k not in loaded for k in self.offered)):
            raise ValueError(f"not loaded: {', '.join(k for k in self.offered if k not in loaded)}")
        self.start: tuple[str, str] = (self.offered[0], self.offered[1])
        self._models: Mapping[str, LoadedModel] = MappingProxyType(
            {k: loaded[k] for k in self.offered if k in loaded})
        self._loader = loader
        self._expected = dict(expected or {})
        self._load_lock = threading.Lock()
        self.max_loaded = max_loaded
        self._release = release  # hands freed memory back to the system (the server's malloc_trim)
        self._used = dict.fromkeys(self._models, time.monotonic())  # key -> last use, for unloading

    @classmethod
    def of(cls, lab: Lab) -> ModelPool:
        """Exactly ``lab``'s models, all loaded (its first two are the starting pair)."""
        return cls(tuple(lab.models), lab.models)

    @property
    def models(self) -> Mapping[str, LoadedModel]:
        """The loaded models now (a read-only snapshot; a later load makes a new one)."""
        return self._models

    def loaded(self, key: str) -> bool:
        return key in self._models

    def name(self, key: str) -> str:
        lm = self._models.get(key)
        return lm.display_name if lm is not None else MODEL_SPECS[key].display_name

    def pretrained(self, key: str) -> bool | None:
        """Whether ``key`` runs with pretrained weights; None while that is not known yet."""
        lm = self._models.get(key)
        if lm is not None:
            return lm.weights.pretrained
        expected = self._expected.get(key)
        return None if expected is None or expected.pretrained else False

    def label(self, key: str) -> str:
        """The name a picker shows: "(untrained)" where the weights are known to be untrained."""
        return self.name(key) + (" (untrained)" if self.pretrained(key) is False else "")

    def choices(self) -> list[tuple[str, str]]:
        return [(self.label(k), k) for k in self.offered]

    def expected(self, key: str) -> Expected | None:
        return self._expected.get(key)

    def pair(self, text: str | Sequence[str] | None) -> tuple[str, str]:
        """``"sanet50,seresnet50"`` (or two keys) -> a checked pair of offered models; empty: the
        starting pair."""
        if not text:
            return self.start
        try:
            keys = parse_model_keys(text, exactly=2)
        except ValueError as exc:
            if "twice" in str(exc):
                raise PairError("Pick two different models: the same one on both sides compares nothing.") from None
            raise PairError(f"{exc}") from None
        unknown = [k for k in keys if k not in self.offered]
        if unknown:
            raise PairError(f"{', '.join(unknown)} is not offered here: choose from {', '.join(self.offered)}")
        return keys[0], keys[1]

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys of ``keys`` not loaded yet."""
        return [k for k in keys if k not in self._models]

    def get(self, key: str, *, keep: Sequence[str] = ()) -> LoadedModel:
        """The loaded model ``key``, loading it first if nobody has (one load at a time; a visitor
        who asks for a model while it loads waits for that load rather than starting another).
        A load beyond ``max_loaded`` unloads the least recently used model not in ``keep``."""
        self._used[key] = time.monotonic()
        lm = self._models.get(key)
        if lm is not None:
            return lm
        if key not in self.offered or self._loader is None:
            raise PairError(f"{key} is not offered here: choose from {', '.join(self.offered)}")
        with self._load_lock:
            lm = self._models.get(key)
            if lm is None:
                self._make_room(keep=(key, *keep))
                start = time.perf_counter()
                log.info("loading %s (first use)", self.name(key))
                lm = self._loader(key)
                self._models = MappingProxyType({**self._models, key: lm})  # copy-on-write
                log.info("%s loaded in %.1f s; %d of %d offered models loaded", lm.display_name,
                         time.perf_counter() - start, len(self._models), len(self.offered))
        return lm

    def _make_room(self, *, keep: Sequence[str]) -> None:
        """Unload least recently used models (not in ``keep``) until one more fits ``max_loaded``;
        hold the load lock. Where only kept models are loaded, the cap gives way (and says so)."""
        while self.max_loaded is not None and len(self._models) >= self.max_loaded:
            idle = [k for k in self._models if k not in keep]
            if not idle:
                log.warning("%d models loaded, over --max-loaded-models %d: all are in use by this pair",
                            len(self._models) + 1, self.max_loaded)
                return
            victim = min(idle, key=lambda k: self._used.get(k, 0.0))
            gone = self._models[victim]
            name = gone.display_name
            self._expected[victim] = Expected(gone.weights.pretrained, gone.weights.note or gone.weights.source)
            self._models = MappingProxyType({k: v for k, v in self._models.items() if k != victim})
            del gone
            gc.collect()  # its tensors go once no running request holds it
            if self._release is not None:  # before the next load, not after it: the peak stays lower
                self._release()
            log.info("unloaded %s (least recently used; at most %d models stay loaded, --max-loaded-models)",
                     name, self.max_loaded)

    def lab(self, keys: Sequence[str]) -> Lab:
        """A lab of ``keys`` (in that order), loading any not loaded yet."""
        return Lab({k: self.get(k, keep=keys) for k in keys})
