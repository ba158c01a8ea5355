"""PyTorch reference of the official AS-ViT inference forward on a timm DeiT, for parity tests.

Follows Cydia2018/AS-ViT (commit e57f445) ``vit.py``: ``Attention.forward`` (:184-208),
``Block.forward`` (:274-283), ``AdaptiveSparsityModule`` (:408-425) and the eval branch of
``VisionTransformerDiffPruning.forward`` (:547-615), re-implemented here on a timm DeiT rather
than importing the official model (``utils.batch_index_select`` is a plain gather). Eval only:

* Every block runs on its current tokens with a plain softmax (``blk(x)`` gets no policy in eval,
  :590/:598): ``x = x + attn(norm1(x))``, ``x = x + mlp(norm2(x))``. Its attention also yields a
  score over its N - 1 patch tokens j (:201-206), from the post-softmax probabilities A [B,H,N,N]
  and the per-head outputs O_h = A_h V_h (before the output projection):

      I[h, j] = ||O_h[j]||_2 / (sum_h' ||O_h'[j]||_2 + 1e-8)
      s_j     = sum_h A_h[0, j] * I[h, j]                      (no renormalisation)

* The score kept between blocks is the one of the last block in ``target_index = [2..11]``
  (:460, :600-609, default ``accu = ema_accu = False``); with a 12-block DeiT and pruning
  locations >= 3 that is always the block just before the pruning block. Right after a pruning
  block the kept scores are gathered (:591) and then overwritten by that block's own score (:609).
* Before each block ``i in pruning_loc`` (default (4, 7, 10), 0-based; stage s counts the pruning
  blocks in network order, ``p_count``), with theta_s = ``score_predictor.{s}.keep_threshold``
  (a 0-d float32 parameter; init 0.001, 0.002, 0.003, :506/:510):

  - batch 1 (:577-579, :416-418): keep exactly the patch tokens with ``s_j > theta_s`` (strict),
    in ascending index order (``torch.nonzero``);
  - batch B > 1 (:580-583, :419-420): ``k = (sum_b sum_j [s_bj > theta_s]) // B`` (host
    ``.item()``), then every image keeps its own top-k by score, in descending score order
    (``argsort(descending=True)[:, :k]``); k may be 0 (only CLS survives).

  CLS is prepended (:586-587) and the tokens are gathered (:588) before the block runs; the pruned
  set shrinks hierarchically (each stage thresholds the scores of the surviving tokens only).
* Head (:611-615): ``norm``, CLS token, ``pre_logits`` (Identity), ``head``.

``batch_rule="mean"`` is the official forward on the whole batch (so a batch of one takes the
batch-1 rule, as the official does); ``batch_rule="image"`` runs every image alone through the
official forward, i.e. the batch-1 rule applied per image (batch-independent results).

Deliberate differences from the official code:

* Batch 1 with exactly one surviving patch token: the official
  ``torch.nonzero(mask.squeeze()).squeeze().unsqueeze(dim=0)`` becomes 1-d and the ``torch.cat``
  with the [1, 1] CLS index raises (the same chain also breaks when one token enters a stage).
  Here that token is simply kept.
* Batch > 1: the official ``argsort`` is not stable; here ``argsort(stable=True)`` (ties go to
  the lower index). Ties have measure zero with real data.
* Distilled DeiT: the official model has no distillation token at all (``pos_embed`` covers
  ``num_patches + 1`` tokens; its ``distill`` flag means teacher-logit distillation during
  training). ``protect_dist=True`` (the saitjax behaviour) keeps DIST beside CLS: scores use the
  CLS row over the patch tokens ``x[:, 2:]`` (A[:, :, 0, 2:], O rows 2..N-1), DIST is never
  pruned and the logits average ``head`` (CLS) and ``head_dist`` (DIST) as timm's eval.
  ``protect_dist=False`` is the naive port of the official slicing (``[:, :, 0, 1:]``): DIST is
  scored and may be pruned like a patch token, and ``head_dist`` reads whatever token sits at
  index 1; it is not an official configuration (reported patch index -1 is DIST). Under the
  batch > 1 rule the kept tokens are re-ordered by score, so DIST leaves index 1 even when no
  token is pruned.
* The official model asserts 224x224 input (``PatchEmbed``) and allocates an unused 14 x 14
  ``prev_decision``; here any size the timm model accepts works. A pruning location whose
  previous block has not produced a score yet (< 3) crashes the official code
  (``global_cls_attn = 0``); here it is refused with an assertion.
* Only plain DeiT-style models are accepted (``tome_reference._check_plain_deit``).

Checkpoint layout: the official model's parameter names are the timm DeiT names
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``) plus ``score_predictor.{s}.keep_threshold`` (0-d);
``infer.py`` loads ``torch.load(path)["model"]``. ``asvit_state_dict`` builds that dict.
"""

from __future__ import annotations

from timm_reference import deit_logits, deit_tokens, timm_attention
from tome_reference import _check_plain_deit

# torch is imported inside the functions, so importing this module never needs torch.

# Blocks whose score replaces the running score (official ``target_index``, vit.py:460).
TARGET_INDEX = tuple(range(2, 12))


def threshold_key(stage):
    """Official state-dict key of stage ``stage``'s threshold."""
    return f"score_predictor.{stage}.keep_threshold"


def asvit_state_dict(timm_model, thresholds=(0.001, 0.002, 0.003)):
    """The timm state dict plus ``score_predictor.{s}.keep_threshold`` (0-d float32 tensors).

    This is the official AS-ViT ``checkpoint["model"]`` layout (for a plain, non-distilled DeiT;
    a distilled model's ``dist_token``/``head_dist`` are kept but have no official counterpart).
    """
    import torch

    out = dict(timm_model.state_dict())
    for s, t in enumerate(thresholds):
        out[threshold_key(s)] = torch.as_tensor(t, dtype=torch.float32).detach().clone().reshape(())
    return out


def asvit_score(probs, heads, prefix=1):
    """Head-importance-weighted CLS attention [B, N - prefix] of the non-prefix tokens.

    ``probs`` [B,H,N,N] post-softmax, ``heads`` [B,H,N,d] = probs @ V (official vit.py:202-206).
    """
    norms = heads[:, :, prefix:].norm(dim=-1)  # [B, H, n]
    importance = norms / (norms.sum(dim=1, keepdim=True) + 1e-8)
    return (probs[:, :, 0, prefix:] * importance).sum(dim=1)


def _keep_indices(score, theta):
    """Official eval decision: kept positions [B, k] among the scored tokens."""
    import torch

    b = score.shape[0]
    mask = score > theta
    if b == 1:
        return torch.nonzero(mask[0]).reshape(1, -1)  # ascending, per-image count
    k = int(mask.sum().item()) // b
    return torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]


def _gather(t, idx):
    """t [B, n, ...] -> rows idx [B, k] (``batch_index_select``)."""
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _official_forward(model, x, thresholds, pruning_loc, prefix, first_index):
    """Official eval forward on tokens x [B, N, C]; returns (logits, counts, kept)."""
    import torch

    b, n, _ = x.shape
    # original patch index of every scored token (-1 for DIST when it is scored, protect_dist=False)
    orig = (torch.arange(n - prefix) + first_index).expand(b, -1)
    score = None
    stage = 0
    counts, kept = [], []
    for i, blk in enumerate(model.blocks):
        if i in pruning_loc:
            idx = _keep_indices(score, thresholds[stage])
            x = torch.cat([x[:, :prefix], _gather(x[:, prefix:], idx)], dim=1)
            orig = _gather(orig, idx)
            counts.append([idx.shape[1]] * b)
            kept.append([sorted(int(j) for j in row) for row in orig])
            score = _gather(score, idx)  # vit.py:591 (overwritten below while i is in TARGET_INDEX)
            stage += 1
        x_attn, probs, heads, _ = timm_attention(blk.attn, blk.norm1(x))
        x = x + x_attn
        x = x + blk.mlp(blk.norm2(x))
        if i in TARGET_INDEX:
            score = asvit_score(probs, heads, prefix)
    return deit_logits(model, x), counts, kept


def asvit_forward(model, images_nchw, thresholds=(0.001, 0.002, 0.003), pruning_loc=(4, 7, 10),
                  batch_rule="image", protect_dist=True, return_info=False):
    """logits [B, classes] (eval mode, no_grad) of timm DeiT ``model`` run the AS-ViT way.

    ``thresholds``: one float or 0-d tensor per pruning location (stage order = network order).
    ``batch_rule``: "image" (each image alone, the official batch-1 rule) or "mean" (the official
    forward on the whole batch: batch-mean k, per-image top-k). With return_info=True also returns
    a dict: 'counts' (list over stages of B ints, kept patch tokens, CLS/DIST excluded) and 'kept'
    (list over stages of B sorted lists of original patch indices, 0-based among the patches).
    """
    from saitjax.convert.timm_import import import_timm

    torch, _ = import_timm()
    _check_plain_deit(model)
    assert batch_rule in ("image", "mean"), batch_rule
    locs = sorted(set(int(i) for i in pruning_loc))
    assert len(locs) == len(pruning_loc), "pruning locations must be distinct"
    assert len(thresholds) == len(locs), "one threshold per pruning location"
    assert not locs or locs[0] - 1 >= TARGET_INDEX[0], "pruning needs a score from a block >= 2"
    thetas = [torch.as_tensor(t, dtype=torch.float32).reshape(()) for t in thresholds]
    distill = getattr(model, "dist_token", None) is not None
    prefix = 1 + int(distill and protect_dist)
    first_index = -1 if (distill and not protect_dist) else 0
    model.eval()
    with torch.no_grad():
        x = deit_tokens(model, images_nchw)
        if batch_rule == "mean":
            logits, counts, kept = _official_forward(model, x, thetas, locs, prefix, first_index)
        else:
            runs = [_official_forward(model, x[b:b + 1], thetas, locs, prefix, first_index)
                    for b in range(x.shape[0])]
            logits = torch.cat([r[0] for r in runs], dim=0)
            stages = range(len(runs[0][1]))  # locations past the last block never run
            counts = [[r[1][s][0] for r in runs] for s in stages]
            kept = [[r[2][s][0] for r in runs] for s in stages]
    if not return_info:
        return logits
    return logits, {"counts": counts, "kept": kept}
