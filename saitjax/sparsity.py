"""Static, hashable descriptions of "how sparse" a forward pass is.

A :class:`SparsitySpec` is the one vocabulary that every model, the trainer, the evaluator and
the benchmark speak. It is a frozen dataclass of Python scalars and tuples, so it can be a
static argument of ``jax.jit``: changing the density at inference means passing another spec,
which selects another cached compiled function and never changes shapes inside one.

Two reduction points exist. *Between* blocks (rules ``topk``, ``mass``, ``value``, ``learned``): tokens are
selected before the blocks ``locations`` on the previous block's attention; ratios are fractions
of the *original* number of patch tokens (196 for DeiT at 224 px), so DynamicViT's schedule at
rho = 0.7 is ``keep_ratios=(0.7, 0.49, 0.343)``; ``learned`` keeps the tokens whose score
exceeds a model's learned per-stage threshold times ``threshold`` (AS-ViT). *Inside* blocks, between attention and MLP
(rules ``evit`` and ``tome``): EViT keeps ``ceil(rate * current patch tokens)`` at ``locations``
and fuses the rest into one token (rates relative to the current count, as in the official
code); ToMe merges ``r`` tokens in every block (``merge_r``: one int for all blocks, or one per
block). *Replacing* the patch tokens (rule ``semantic``, STViT): before block ``location`` the
patch tokens are pooled into ``semantic_tokens`` tokens that attend to the image tokens for
``1 + update_layers`` blocks; later blocks see only the prefix and the semantic tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

KEEP_RULES = ("topk", "mass", "value", "learned", "skip", "evit", "tome", "semantic")
IN_BLOCK_RULES = ("evit", "tome")  # reduce between attention and MLP of a block
ADAPTIVE_RULES = ("mass", "value", "learned")  # per-image counts
MODES = ("gather", "mask")
# The model family that implements each rule beyond fixed top-k (for error messages).
RULE_FAMILY = {"mass": "sait", "value": "sait", "learned": "asvit", "evit": "evit", "tome": "tome",
               "semantic": "stvit"}
DEFAULT_LOCATIONS = (3, 6, 9)

# Guard against 196 * 0.7 ** 2 = 96.03999... style rounding turning into an off-by-one.
_FLOOR_EPS = 1e-9


class SparsityError(ValueError):
    """A sparsity spec that cannot be built or does not fit the model."""


def _as_tuple(values: Iterable, kind: type, field: str) -> tuple:
    try:
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError) as err:
        raise SparsityError(f"{field} must be a sequence of {kind.__name__}, got {values!r}") from err


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
    """Where tokens are pruned, how many survive, and how the pruned set is represented.

    Attributes:
      locations: prune *before* these blocks (0-based, strictly increasing).
      keep_ratios: for the ``topk`` rule, the fraction of the original patch tokens kept after
        each stage (one per location, non-increasing, in (0, 1]).
      rule: ``topk`` (fixed count per stage), ``mass`` (per image, smallest set holding
        ``threshold`` of the score mass), ``value`` (per image, tokens with normalised score
        >= ``threshold`` / N), ``learned`` (per image, tokens scoring above the model's learned
        threshold of the stage times ``threshold``) or ``skip`` (no pruning: the dense model).
      threshold: parameter of the ``mass``, ``value`` and ``learned`` rules.
      min_keep, max_keep: per-image counts of adaptive rules are clamped to
        ``[ceil(min_keep * N), floor(max_keep * N)]``.
      buckets: capacities (fractions of N) that adaptive counts are padded to; one compiled
        branch per bucket. Increasing; empty means the single bucket 1.0.
      mode: ``gather`` shortens the sequence (real savings); ``mask`` keeps every token and hides
        the pruned ones from attention (training, and the equivalence check of the two).
      chunks: adaptive rules at batch > 1 sort the images by their count and split the batch into
        this many equal chunks, each run in its own bucket (1: the whole batch in the bucket of
        its largest image). A batch that ``chunks`` does not divide uses its largest divisor
        below ``chunks``.
      fuse: ``evit`` only: fuse the inattentive tokens into one extra token (else drop them).
      merge_r: ``tome`` only: tokens merged per block, one int for every block or one per block
        from block 0 (missing blocks merge none).
      inflect: ``tome`` only, with one ``r``: ToMe's linear schedule from ``r(1 - inflect)`` to
        ``r(1 + inflect)`` over the blocks (-1: the paper's decreasing schedule).
      semantic_tokens: ``semantic`` only: the number of semantic tokens (a square, the pooling
        grid). Its ``locations`` are consecutive: generation before the first, one update per
        further location but the last, and the image tokens leave before the last.
    """

    locations: tuple[int, ...] = ()
    keep_ratios: tuple[float, ...] = ()
    rule: str = "topk"
    threshold: float | None = None
    min_keep: float = 0.0
    max_keep: float = 1.0
    buckets: tuple[float, ...] = ()
    mode: str = "gather"
    chunks: int = 1
    fuse: bool = True
    merge_r: tuple[int, ...] = ()
    inflect: float = 0.0
    semantic_tokens: int = 0

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("locations", _as_tuple(self.locations, int, "locations"))
        set_("merge_r", _as_tuple(self.merge_r, int, "merge_r"))
        set_("inflect", float(self.inflect))
        set_("keep_ratios", _as_tuple(self.keep_ratios, float, "keep_ratios"))
        set_("buckets", _as_tuple(self.buckets, float, "buckets"))
        if self.threshold is not None:
            set_("threshold", float(self.threshold))
        self._validate()

    # -- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.rule not in KEEP_RULES:
            raise SparsityError(f"unknown keep rule {self.rule!r}; choose one of {KEEP_RULES}")
        if self.mode not in MODES:
            raise SparsityError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        locs = self.locations
        if any(l < 0 for l in locs) or any(b <= a for a, b in zip(locs, locs[1:])):
            raise SparsityError(f"locations must be non-negative and strictly increasing, got {locs}")
        for r in self.keep_ratios + (self.max_keep,):
            if not 0.0 < r <= 1.0:
                raise SparsityError(
                    f"keep ratio {r} is outside (0, 1]: a ratio is the fraction of patch tokens kept, "
                    "e.g. 0.7 keeps 70 %; use rule='skip' (or SparsitySpec.dense()) for no pruning")
        if not 0.0 <= self.min_keep <= self.max_keep:
            raise SparsityError(f"min_keep={self.min_keep} must lie in [0, max_keep={self.max_keep}]")
        if self.rule in IN_BLOCK_RULES and self.mode != "gather":
            raise SparsityError(f"rule {self.rule!r} reduces tokens inside blocks with static counts and "
                                "has no 'mask' mode; it trains in 'gather' mode")
        if self.chunks < 1 or (self.chunks > 1 and self.rule not in ADAPTIVE_RULES):
            raise SparsityError(f"chunks={self.chunks}: micro-batch chunks (>= 1) apply to the adaptive "
                                f"rules {ADAPTIVE_RULES} only, not {self.rule!r}")
        if not self.fuse and self.rule != "evit":
            raise SparsityError(f"fuse=False applies to rule 'evit' only, not {self.rule!r}")
        if self.rule == "tome":
            if locs or self.keep_ratios:
                raise SparsityError("rule 'tome' merges in every block: give merge_r, not locations/keep_ratios")
            if not self.merge_r or any(r < 0 for r in self.merge_r):
                raise SparsityError(f"rule 'tome' needs merge_r: tokens merged per block (>= 0), got {self.merge_r}")
            if self.inflect and len(self.merge_r) != 1:
                raise SparsityError("inflect applies to a single r (ToMe's (r, inflect) schedule), not a per-block list")
        elif self.merge_r or self.inflect:
            raise SparsityError(f"merge_r/inflect apply to rule 'tome' only, not {self.rule!r}")
        if self.rule == "semantic":
            t = self.semantic_tokens
            if t < 1 or math.isqrt(t) ** 2 != t:
                raise SparsityError(f"rule 'semantic' needs a square number of semantic tokens "
                                    f"(a pooling grid: 4, 9, 16, ...), got {t}")
            if len(locs) < 2 or any(b != a + 1 for a, b in zip(locs, locs[1:])):
                raise SparsityError(f"rule 'semantic' needs consecutive locations (generation, updates, "
                                    f"end of the image tokens), got {locs}; use SparsitySpec.semantic()")
            if self.mode != "gather":
                raise SparsityError("rule 'semantic' replaces the patch tokens; it has no 'mask' mode")
        elif self.semantic_tokens:
            raise SparsityError(f"semantic_tokens applies to rule 'semantic' only, not {self.rule!r}")
        if self.rule == "evit":
            if not locs or len(self.keep_ratios) != len(locs):
                raise SparsityError(
                    f"evit needs one keep rate per location: {len(locs)} locations {locs} but "
                    f"{len(self.keep_ratios)} keep rates {self.keep_ratios}")
        elif self.rule == "topk":
            if len(self.keep_ratios) != len(locs):
                raise SparsityError(
                    f"topk needs one keep ratio per location: {len(locs)} locations {locs} but "
                    f"{len(self.keep_ratios)} keep_ratios {self.keep_ratios}")
            if any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
                raise SparsityError(
                    f"keep_ratios must be non-increasing (a pruned token stays pruned), got {self.keep_ratios}")
        elif self.keep_ratios:
            raise SparsityError(f"keep_ratios apply to rule='topk' only, not {self.rule!r}")
        if self.rule in ADAPTIVE_RULES:
            if not locs:
                raise SparsityError(f"rule {self.rule!r} needs at least one pruning location")
            if self.threshold is None:
                raise SparsityError(f"rule {self.rule!r} needs a threshold (mass m or value theta)")
            if self.rule == "mass" and not 0.0 < self.threshold <= 1.0:
                raise SparsityError(f"mass threshold {self.threshold} is outside (0, 1]")
            if self.rule == "value" and not self.threshold > 0.0:
                raise SparsityError(f"value threshold {self.threshold} must be positive")
            if self.rule == "learned" and not 0.0 < self.threshold < math.inf:
                raise SparsityError(f"learned-threshold scale {self.threshold} must be positive and finite "
                                    "(1.0: the thresholds as trained; larger prunes more)")
        elif self.threshold is not None:
            raise SparsityError(f"threshold applies to rules {ADAPTIVE_RULES}, not {self.rule!r}")
        b = self.buckets
        if any(not 0.0 < x <= 1.0 for x in b) or any(y <= x for x, y in zip(b, b[1:])):
            raise SparsityError(f"buckets must be strictly increasing fractions in (0, 1], got {b}")

    def check_depth(self, depth: int) -> None:
        """Raise if a pruning location does not exist in a model of ``depth`` blocks."""
        if self.rule == "tome" and len(self.merge_r) > depth:
            raise SparsityError(f"merge_r gives {len(self.merge_r)} blocks but the model has {depth}")
        if self.rule == "semantic":  # the image tokens may be read to the end (release after the last block)
            bad = [l for l in self.locations[:-1] if l >= depth] + [l for l in self.locations[-1:] if l > depth]
            if bad:
                raise SparsityError(f"semantic tokens from block {self.locations[0]} with {self.update_layers} update "
                                    f"block(s) need {self.locations[-1]} <= depth, but the model has {depth} blocks")
            return
        if self.rule in IN_BLOCK_RULES:
            bad = [l for l in self.locations if l >= depth]
            if bad:
                raise SparsityError(f"reduction blocks {bad} do not exist in a {depth}-block model "
                                    f"(0-based: 0..{depth - 1})")
            return
        bad = [l for l in self.locations if l >= depth or l == 0]
        if bad and not self.is_dense:
            raise SparsityError(
                f"pruning locations {bad} do not fit a {depth}-block model: prune before blocks "
                f"1..{depth - 1} (block 0 has no attention yet to score tokens with)")

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def dense(cls) -> "SparsitySpec":
        """No pruning: bit-identical to the dense backbone."""
        return cls(rule="skip")

    @classmethod
    def topk(cls, keep_ratios: Sequence[float], locations: Sequence[int] = DEFAULT_LOCATIONS,
             mode: str = "gather") -> "SparsitySpec":
        """Fixed keep ratios per stage (fractions of the original patch tokens)."""
        return cls(locations=tuple(locations), keep_ratios=tuple(keep_ratios), mode=mode)

    @classmethod
    def hierarchical(cls, rho: float, locations: Sequence[int] = DEFAULT_LOCATIONS,
                     mode: str = "gather") -> "SparsitySpec":
        """DynamicViT's schedule: keep rho, rho^2, rho^3, ... of the original tokens."""
        if not 0.0 < rho <= 1.0:
            raise SparsityError(f"keep ratio rho={rho} is outside (0, 1]")
        ratios = tuple(round(rho ** (s + 1), 10) for s in range(len(locations)))
        return cls.topk(ratios, locations, mode)

    @classmethod
    def linear(cls, rho: float, locations: Sequence[int] = (1, 2, 3), step: float = 0.2,
               mode: str = "gather") -> "SparsitySpec":
        """DynamicViT's schedule on hierarchical models: rho, rho - step, rho - 2 step, ... of all
        locations of the map, computed in float64 as the official code does (``0.7 - 0.2`` is
        ``0.49999999999999994``, so 196 locations give 137 / 97 / 58 under the models' truncation)."""
        ratios = tuple(rho - step * s if s else rho for s in range(len(locations)))
        if not 0.0 < rho <= 1.0 or ratios[-1] <= 0.0:
            raise SparsityError(f"linear schedule rho={rho}, step={step} over {len(locations)} stages gives "
                                f"ratios {tuple(f'{r:.6g}' for r in ratios)}: every ratio must lie in (0, 1]; "
                                f"use rho > {step * (len(locations) - 1):g}")
        return cls.topk(ratios, locations, mode)

    @classmethod
    def adaptive(cls, rule: str, threshold: float, locations: Sequence[int] = (3,),
                 min_keep: float = 0.0, max_keep: float = 1.0,
                 buckets: Sequence[float] = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0),
                 mode: str = "gather") -> "SparsitySpec":
        """Per-image counts (SaiT ``mass``/``value``) served by capacity buckets."""
        return cls(locations=tuple(locations), rule=rule, threshold=threshold, min_keep=min_keep,
                   max_keep=max_keep, buckets=tuple(buckets), mode=mode)

    @classmethod
    def learned(cls, scale: float = 1.0, locations: Sequence[int] = (4, 7, 10),
                buckets: Sequence[float] = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0), chunks: int = 1,
                mode: str = "gather") -> "SparsitySpec":
        """AS-ViT: per image, the tokens scoring above each stage's learned threshold x ``scale``."""
        return cls(locations=tuple(locations), rule="learned", threshold=scale, buckets=tuple(buckets),
                   chunks=chunks, mode=mode)

    @classmethod
    def evit(cls, keep_rate: float | Sequence[float] = 0.7, locations: Sequence[int] = DEFAULT_LOCATIONS,
             fuse: bool = True) -> "SparsitySpec":
        """EViT: inside blocks ``locations`` keep ``ceil(rate * current patch tokens)``, fuse the rest."""
        rates = (keep_rate,) * len(locations) if isinstance(keep_rate, (int, float)) else tuple(keep_rate)
        return cls(locations=tuple(locations), keep_ratios=rates, rule="evit", fuse=fuse)

    @classmethod
    def tome(cls, r: int | Sequence[int], inflect: float = 0.0) -> "SparsitySpec":
        """ToMe: merge ``r`` tokens in every block (an int), or ``r[i]`` in block ``i`` (a list)."""
        merge_r = (r,) if isinstance(r, int) else tuple(r)
        return cls(rule="tome", merge_r=merge_r, inflect=inflect)

    @classmethod
    def semantic(cls, tokens: int = 16, location: int = 4, update_layers: int = 1) -> "SparsitySpec":
        """STViT: ``tokens`` semantic tokens generated before block ``location``, refined by
        ``update_layers`` more blocks that also read the image tokens; the rest run on them alone."""
        if update_layers < 0:
            raise SparsityError(f"update_layers={update_layers} must be >= 0")
        return cls(locations=tuple(range(location, location + update_layers + 2)), rule="semantic",
                   semantic_tokens=tokens)

    @property
    def update_layers(self) -> int:
        """``semantic`` only: blocks after the generation block that still read the image tokens."""
        return len(self.locations) - 2 if self.rule == "semantic" else 0

    def needs_family(self) -> str:
        """``"needs create_model('sait_...')"``-style advice for a model that cannot run this rule."""
        family = RULE_FAMILY.get(self.rule)
        return f"rule {self.rule!r} needs " + (f"a model of the {family}_* family (create_model('{family}_...'))"
                                               if family else "any model")

    def with_mode(self, mode: str) -> "SparsitySpec":
        return dataclasses.replace(self, mode=mode)

    def with_chunks(self, chunks: int) -> "SparsitySpec":
        return dataclasses.replace(self, chunks=chunks)

    # -- static sizes ----------------------------------------------------------------------------

    @property
    def is_dense(self) -> bool:
        if self.rule == "tome":
            return all(r == 0 for r in self.merge_r)
        return self.rule == "skip" or not self.locations or (
            self.rule in ("topk", "evit") and all(r == 1.0 for r in self.keep_ratios)) or (
            self.rule == "mass" and self.threshold >= 1.0)

    @property
    def is_adaptive(self) -> bool:
        return self.rule in ADAPTIVE_RULES

    @property
    def in_block(self) -> bool:
        """True if tokens are reduced inside blocks (between attention and MLP)."""
        return self.rule in IN_BLOCK_RULES

    def merge_schedule(self, depth: int) -> tuple[int, ...]:
        """ToMe's ``r`` per block (``tome.utils.parse_r``): an int for all blocks, the linear
        ``(r, inflect)`` schedule, or a per-block list padded with zeros."""
        if self.rule != "tome":
            return (0,) * depth
        if len(self.merge_r) > 1:
            return self.merge_r + (0,) * (depth - len(self.merge_r))
        r = self.merge_r[0]
        low = int(r * (1.0 - self.inflect))
        step = (2 * r - 2 * low) / max(depth - 1, 1)
        return tuple(int(low + step * i) for i in range(depth))

    def keep_counts(self, num_patches: int) -> tuple[int, ...]:
        """Static patch-token counts after each stage of a ``topk`` spec (at least 1)."""
        if self.rule != "topk":
            raise SparsityError(f"rule {self.rule!r} has per-image counts; use bucket_capacities()")
        return tuple(max(1, math.floor(num_patches * r + _FLOOR_EPS)) for r in self.keep_ratios)

    def count_bounds(self, num_patches: int) -> tuple[int, int]:
        """Clamp range ``[K_min, K_max]`` of per-image counts of an adaptive rule.

        At least one patch token survives, except under ``learned`` thresholds, where an image
        whose tokens all score below the threshold keeps only its prefix (as AS-ViT does).
        """
        lo = max(0 if self.rule == "learned" else 1, math.ceil(num_patches * self.min_keep - _FLOOR_EPS))
        hi = max(lo, math.floor(num_patches * self.max_keep + _FLOOR_EPS))
        return lo, hi

    def bucket_capacities(self, num_patches: int, multiple: int = 8) -> tuple[int, ...]:
        """Static capacities (token counts) of the buckets, rounded up to ``multiple``.

        The last capacity is always large enough for ``K_max``, so every image fits a bucket.
        """
        fractions = self.buckets or (1.0,)
        _, hi = self.count_bounds(num_patches)
        caps = []
        for f in fractions:
            cap = min(num_patches, multiple * math.ceil(num_patches * f / multiple - _FLOOR_EPS))
            if cap not in caps:
                caps.append(cap)
        if caps[-1] < hi:
            caps.append(hi)
        return tuple(caps)

    def describe(self) -> str:
        """Canonical density string, e.g. ``topk:0.7/0.49/0.343@3/6/9``; :func:`parse_density` reads it back."""
        if self.is_dense:
            return "dense"
        locs = "/".join(str(l) for l in self.locations)
        if self.rule == "tome":
            inflect = f",inflect={self.inflect:g}" if self.inflect else ""
            return f"tome:{'/'.join(map(str, self.merge_r))}{inflect}"
        if self.rule == "semantic":
            update = f",update={self.update_layers}" if self.update_layers != 1 else ""
            return f"semantic:{self.semantic_tokens}@{self.locations[0]}{update}"
        if self.rule in ("topk", "evit"):
            rates = self.keep_ratios
            if self.rule == "evit" and len(set(rates)) == 1:
                rates = rates[:1]
            fuse = "" if self.fuse else ",fuse=0"
            return f"{self.rule}:{'/'.join(_exact(r) for r in rates)}@{locs}{fuse}"
        extra = ""
        if (self.min_keep, self.max_keep) != (0.0, 1.0):
            extra += f"[{self.min_keep:g}-{self.max_keep:g}]"
        chunks = f",chunks={self.chunks}" if self.chunks > 1 else ""
        return f"{self.rule}:{self.threshold:g}{extra}@{locs}{chunks}"


def _exact(ratio: float) -> str:
    """A ratio as written in density strings: 6 significant digits where they give back the same
    float (0.343), else Python's shortest exact form (0.49999999999999994), so that parsing
    :meth:`SparsitySpec.describe` gives back the same spec and the same token counts."""
    short = f"{ratio:.6g}"
    return short if float(short) == ratio else repr(ratio)


def parse_density(text: str, locations: Sequence[int] = DEFAULT_LOCATIONS,
                  buckets: Sequence[float] = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)) -> SparsitySpec:
    """Parse a density string as used in configs and CLIs.

    ``dense``; ``topk:0.7`` (rho, rho^2, ... at ``locations``); ``topk:0.7/0.5/0.3@3/6/9``;
    ``mass:0.9@3``; ``value:1.0[0.1-0.9]@3`` (optional ``[min_keep-max_keep]`` clamp);
    ``learned:1.0@4/7/10`` (AS-ViT's learned thresholds, scaled);
    ``evit:0.7@3/6/9`` (EViT keep rate inside those blocks; ``,fuse=0`` drops instead of fusing);
    ``tome:13`` (ToMe, r per block; ``tome:16/16/12/8``, ``tome:13,inflect=-1``);
    ``semantic:16@4`` (STViT: 16 semantic tokens from block 4; ``,update=0`` skips the update
    block). Options
    ``,chunks=4`` (adaptive rules: sorted micro-batches) follow the main part.
    """
    if not isinstance(text, str):
        raise SparsityError(f"density {text!r} is a {type(text).__name__}, not a string: write each density as "
                            "a string, e.g. 'dense', 'topk:0.7' or 'mass:0.9@3'")
    text = text.strip()
    if text in ("dense", "skip"):
        return SparsitySpec.dense()
    rule, sep, rest = text.partition(":")
    if not sep or rule not in KEEP_RULES:
        raise SparsityError(f"cannot parse density {text!r}: expected 'dense', 'topk:0.7', "
                            "'topk:0.7/0.49/0.343@3/6/9', 'mass:0.9@3', 'value:1.0@3', "
                            "'learned:1.0@4/7/10', 'evit:0.7@3/6/9', 'tome:13' or 'semantic:16@4'")
    main, *option_texts = rest.split(",")
    param, _, locs_text = main.partition("@")
    try:
        options = {}
        for opt in option_texts:
            key, eq, value = opt.partition("=")
            if not eq or key.strip() not in ("chunks", "fuse", "inflect", "update"):
                raise ValueError(f"unknown option {opt!r} (options: chunks=N, fuse=0/1, inflect=X, update=N)")
            options[key.strip()] = float(value)
        locs = tuple(int(l) for l in locs_text.split("/")) if locs_text else tuple(locations)
        clamp = (0.0, 1.0)
        if "[" in param:
            param, _, bounds = param.partition("[")
            clamp = tuple(float(b) for b in bounds.rstrip("]").split("-"))
        values = [float(v) for v in param.split("/")]
    except ValueError as err:
        raise SparsityError(f"cannot parse density {text!r}: {err}") from None
    extra = {}
    if "chunks" in options:
        extra["chunks"] = int(options.pop("chunks"))
    if rule == "semantic":
        if len(values) != 1 or values[0] != int(values[0]) or len(locs) != 1 or not locs_text:
            raise SparsityError(f"density {text!r}: write semantic:<tokens>@<block>, e.g. semantic:16@4")
        spec = SparsitySpec.semantic(int(values[0]), locs[0], int(options.pop("update", 1)))
    elif rule == "tome":
        if any(v != int(v) for v in values):
            raise SparsityError(f"density {text!r}: ToMe's r must be whole token counts")
        r = [int(v) for v in values]
        spec = SparsitySpec.tome(r[0] if len(r) == 1 else r, options.pop("inflect", 0.0))
    elif rule == "evit":
        spec = SparsitySpec.evit(values[0] if len(values) == 1 else values, locs,
                                 fuse=bool(options.pop("fuse", 1.0)))
    elif rule == "topk":
        spec = SparsitySpec.hierarchical(values[0], locs) if len(values) == 1 else SparsitySpec.topk(values, locs)
    elif len(values) != 1:
        raise SparsityError(f"density {text!r}: rule {rule!r} takes one threshold")
    else:
        spec = SparsitySpec.adaptive(rule, values[0], locs, min_keep=clamp[0], max_keep=clamp[1],
                                     buckets=buckets)
    if options:
        raise SparsityError(f"density {text!r}: option(s) {sorted(options)} do not apply to rule {rule!r}")
    return dataclasses.replace(spec, **extra) if extra else spec


def parse_keep(text: str, locations: Sequence[int] = DEFAULT_LOCATIONS) -> SparsitySpec:
    """Parse a CLI value: ``1`` (dense), ``0.7`` (rho, rho^2, rho^3) or ``0.7,0.49,0.343``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SparsityError(f"cannot parse keep ratios {text!r}: expected e.g. 0.7 or 0.7,0.49,0.343") from err
    if not values:
        raise SparsityError("empty keep ratio")
    if len(values) == 1:
        if values[0] == 1.0:
            return SparsitySpec.dense()
        return SparsitySpec.hierarchical(values[0], locations)
    return SparsitySpec.topk(values, locations)
