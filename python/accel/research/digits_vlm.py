"""A small VLM whose weights this project trains itself: real images, a real frozen language model.

No VLM or vision-encoder weights install offline, so accuracy numbers for the pruning policies come from
this model, and everything that reports them says it is **project-trained**:

* images: scikit-learn's handwritten digits (1,797 real 8x8 scans that ship inside the package),
  upscaled 2x and placed at a random position on a 32x32 noisy canvas, so the digit covers 16 of the 64
  patches and the rest is background: which tokens a pruning policy keeps matters;
* vision tower: a CLIP ViT (transformers' ``CLIPVisionModel``, 4 layers, width 64, 4x4 patches, with a
  [CLS] token) trained from scratch, first as a digit classifier on its [CLS] output;
* projector: LLaVA's two-layer MLP into the LM's embedding space;
* language model: SmolLM2-135M, frozen, answering ``Question: Which digit is in the image? Answer: <d>``;
* the whole thing is a ``transformers.LlavaForConditionalGeneration`` (features from vision layer -2,
  [CLS] dropped, as LLaVA-1.5), so accel's LLaVA adapter prunes it like any LLaVA.

``load_or_train`` trains once (two stages, ~10 minutes on the 2-core CPU here) and caches the tower and
projector under ``$ACCEL_CACHE_DIR/vlm``; ``evaluate`` reports first-token accuracy on held-out digits.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import AccelError

logger = logging.getLogger("accel")

IMAGE_TOKEN = "<jupyter_output>"  # a SmolLM2 special token plain prompts never contain
PROMPT_PRE = "Image:"
PROMPT_POST = "\nQuestion: Which digit is in the image? Answer:"


@dataclass
class DigitsConfig:
    canvas: int = 32
    scale: int = 2
    noise: float = 0.15
    align: bool = True
    patch: int = 4
    width: int = 64
    layers: int = 4
    heads: int = 4
    n_train: int = 1400
    #: random affine warps of the digit in training ([INFER] off: on held-out digits it scored 63% vs 73%
    #: without, tower-only, 30 epochs)
    augment: bool = False
    stage_a_epochs: int = 30
    stage_a_lr: float = 3e-3
    stage_b_steps: int = 90
    stage_b_batch: int = 16
    stage_b_lr: float = 1e-3
    seed: int = 0
    version: int = 1

    @property
    def tokens(self) -> int:
        return (self.canvas // self.patch) ** 2

    def key(self) -> str:
        return f"digits-vlm-v{self.version}-c{self.canvas}p{self.patch}w{self.width}l{self.layers}-s{self.seed}"


# -- data -------------------------------------------------------------------------------------------------
def digits_split(cfg: DigitsConfig):
    """``(train_images, train_labels, test_images, test_labels)``: sklearn's digits (8x8, values 0..16),
    a fixed permutation split (seed 0)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - installed by scripts/setup.sh
        raise AccelError("the digits VLM needs scikit-learn (its bundled digits dataset): pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[: cfg.n_train], perm[cfg.n_train:]
    return x[tr], y[tr], x[te], y[te]


def render(images: torch.Tensor, cfg: DigitsConfig, generator: torch.Generator, augment: bool = False) -> torch.Tensor:
    """Place each 8x8 digit (upscaled ``scale``x) at a random spot of a noisy ``canvas`` square;
    returns CLIP-style pixel values ``[B, 3, canvas, canvas]`` in [-1, 1]-ish. ``augment`` (training
    only) applies a small random affine warp (rotation +-12 deg, scale 0.9-1.1, shear +-0.15) to the digit."""
    b = images.shape[0]
    s = 8 * cfg.scale
    big = images.repeat_interleave(cfg.scale, 1).repeat_interleave(cfg.scale, 2)
    if augment:
        ang = (torch.rand(b, generator=generator) - 0.5) * (2 * 12 * 3.14159 / 180)
        sc = 0.9 + 0.2 * torch.rand(b, generator=generator)
        sh = (torch.rand(b, generator=generator) - 0.5) * 0.3
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = torch.cos(ang) / sc
        theta[:, 0, 1] = -torch.sin(ang) / sc + sh
        theta[:, 1, 0] = torch.sin(ang) / sc
        theta[:, 1, 1] = torch.cos(ang) / sc
        grid = torch.nn.functional.affine_grid(theta, (b, 1, s, s), align_corners=False)
        big = torch.nn.functional.grid_sample(big[:, None], grid, align_corners=False)[:, 0].clamp(0, 1)
    out = cfg.noise * torch.rand(b, cfg.canvas, cfg.canvas, generator=generator)
    span = cfg.canvas - s + 1
    step = cfg.patch if cfg.align else 1  # patch-aligned placement: a digit's patches look the same anywhere
    ys = torch.randint(0, (span - 1) // step + 1, (b,), generator=generator) * step
    xs = torch.randint(0, (span - 1) // step + 1, (b,), generator=generator) * step
    for i in range(b):
        y0, x0 = int(ys[i]), int(xs[i])
        out[i, y0:y0 + s, x0:x0 + s] = torch.maximum(out[i, y0:y0 + s, x0:x0 + s], big[i])
    return ((out - 0.5) / 0.5)[:, None].expand(b, 3, cfg.canvas, cfg.canvas).contiguous()


# -- the model --------------------------------------------------------------------------------------------
def vision_config(cfg: DigitsConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=2 * cfg.width, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, image_size=cfg.canvas, patch_size=cfg.patch, num_channels=3)


def build_vlm(lm, tok, cfg: DigitsConfig):
    """A ``LlavaForConditionalGeneration`` around the (frozen) causal LM ``lm``; the tower and projector
    are freshly initialised. Returns ``(vlm, image_token_id)``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tok.unk_token_id:
        raise AccelError(f"the tokenizer has no {IMAGE_TOKEN!r} token to use as the image placeholder")
    torch.manual_seed(cfg.seed)
    lcfg = LlavaConfig(vision_config=vision_config(cfg), text_config=lm.config, image_token_id=image_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=lm.config.tie_word_embeddings)
    vlm = LlavaForConditionalGeneration(lcfg)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight if lm.config.tie_word_embeddings else \
        torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    for p in vlm.model.language_model.parameters():
        p.requires_grad_(False)
    vlm.lm_head.weight.requires_grad_(False)
    vlm.set_attn_implementation("sdpa")
    return vlm.eval(), image_id


def prompt_ids(tok, image_id: int, n_tokens: int, batch: int) -> torch.Tensor:
    pre = tok(PROMPT_PRE, add_special_tokens=False)["input_ids"]
    post = tok(PROMPT_POST, add_special_tokens=False)["input_ids"] + tok(" ", add_special_tokens=False)["input_ids"]
    return torch.tensor([pre + [image_id] * n_tokens + post] * batch)


def digit_token_ids(tok) -> list[int]:
    ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise AccelError("the tokenizer has no single-token digits")
    return ids


# -- training ---------------------------------------------------------------------------------------------
def _trainable_state(vlm) -> dict:
    out = {f"vision_tower.{k}": v for k, v in vlm.model.vision_tower.state_dict().items()}
    out.update({f"multi_modal_projector.{k}": v for k, v in vlm.model.multi_modal_projector.state_dict().items()})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _load_trainable(vlm, state: dict) -> None:
    vt = {k[len("vision_tower."):]: v for k, v in state.items() if k.startswith("vision_tower.")}
    pj = {k[len("multi_modal_projector."):]: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    vlm.model.vision_tower.load_state_dict(vt)
    vlm.model.multi_modal_projector.load_state_dict(pj)


def train(vlm, tok, image_id: int, cfg: DigitsConfig, progress: bool = False) -> dict:
    """Stage A: the tower as a digit classifier on its [CLS] output (a linear head, discarded after).
    Stage B: tower + projector through the frozen LM, cross-entropy on the answer digit token.
    Returns a record of the run (losses, accuracies, seconds)."""
    from tqdm.auto import tqdm

    xtr, ytr, _, _ = digits_split(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    tower = vlm.model.vision_tower
    head = torch.nn.Linear(cfg.width, 10)
    record: dict = {"config": asdict(cfg)}
    t0 = time.time()
    # stage A
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage_a_lr, weight_decay=0.05)
    tower.train()
    bs = 64
    steps_a = cfg.stage_a_epochs * ((len(ytr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.stage_a_lr, total_steps=steps_a, pct_start=0.1)
    bar = tqdm(total=steps_a, desc="digits VLM stage A (tower)", disable=not progress)
    correct = seen = 0
    for ep in range(cfg.stage_a_epochs):
        perm = torch.randperm(len(ytr), generator=g)
        correct = seen = 0
        for s in range(0, len(ytr), bs):
            idx = perm[s:s + bs]
            pv = render(xtr[idx], cfg, g, augment=cfg.augment)
            out = tower(pv)
            logits = head(out.pooler_output)
            loss = torch.nn.functional.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(-1) == ytr[idx]).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    record["stage_a_train_acc_last_epoch"] = correct / max(seen, 1)
    record["stage_a_seconds"] = round(time.time() - t0, 1)
    # stage B
    t1 = time.time()
    digit_ids = torch.tensor(digit_token_ids(tok))
    ids = prompt_ids(tok, image_id, cfg.tokens, cfg.stage_b_batch)
    perm, pos = torch.randperm(len(ytr), generator=g), 0

    def batch(step):
        nonlocal perm, pos
        if pos + cfg.stage_b_batch > len(ytr):
            perm, pos = torch.randperm(len(ytr), generator=g), 0
        idx = perm[pos:pos + cfg.stage_b_batch]
        pos += cfg.stage_b_batch
        return ids, render(xtr[idx], cfg, g, augment=cfg.augment), digit_ids[ytr[idx]]

    losses, hits = train_projector(vlm, cfg, batch, "digits VLM stage B (projector through the frozen LM)", progress, 8)
    record["stage_b_loss_first_last"] = [round(losses[0], 4), round(sum(losses[-5:]) / 5, 4)]
    record["stage_b_train_acc_last_8_steps"] = round(sum(hits[-8:]) / len(hits[-8:]), 4)
    record["stage_b_seconds"] = round(time.time() - t1, 1)
    record["seconds"] = round(time.time() - t0, 1)
    return record


def train_projector(vlm, cfg, batch, desc: str, progress: bool, window: int,
                    extra: tuple[list, float] | None = None, steps: int | None = None,
                    lr: float | None = None) -> tuple[list, list]:
    """Stage B of the project-trained VLMs: the projector, and the tower at a tenth of the rate, through the frozen
    language model, cross-entropy on the answer token. ``batch(step)`` gives ``(input_ids, pixel_values, answer token
    ids)``, or ``(input_ids, pixel_values, (positions, answer ids))`` with several answers per prompt (the logits at
    ``positions`` [Q] predict ``answer ids`` [B, Q]); ``extra``: more parameters to train and their learning rate (the
    language model's low-rank adapters).
    ``steps`` / ``lr``: the run's length and the projector's rate (default ``cfg.stage_b_steps`` / ``cfg.stage_b_lr``).
    Returns the per-step losses and accuracies; the tower is left in eval mode."""
    from tqdm.auto import tqdm

    steps = cfg.stage_b_steps if steps is None else steps
    lr = cfg.stage_b_lr if lr is None else lr
    tower, proj = vlm.model.vision_tower, vlm.model.multi_modal_projector
    groups = [{"params": list(proj.parameters()), "lr": lr},
              {"params": list(tower.parameters()), "lr": lr * 0.1}]
    if extra is not None and extra[0]:
        groups.append({"params": list(extra[0]), "lr": extra[1]})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    losses, hits = [], []
    for step in range(steps):
        ids, pv, answer = batch(step)
        if isinstance(answer, tuple):  # (positions [Q], answer ids [B, Q]): several answers per prompt
            pos, answer = answer
            hidden = vlm.model(input_ids=ids, pixel_values=pv, use_cache=False).last_hidden_state
            logits = vlm.lm_head(hidden[:, pos]).flatten(0, 1)
            answer = answer.flatten()
        else:
            logits = vlm(input_ids=ids, pixel_values=pv, logits_to_keep=1, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        hits.append(float((logits.argmax(-1) == answer).float().mean()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{sum(hits[-window:]) / len(hits[-window:]):.2f}")
    bar.close()
    tower.eval()
    return losses, hits


def cached_vlm(cfg, build, train_fn, progress: bool, retrain: bool, what: str, load_extra=None):
    """A project-trained VLM ``(vlm, tokenizer, image_token_id, record)``: ``build(lm, tok, cfg)`` around the frozen
    SmolLM2-135M (installed offline by ``scripts/setup.sh``), its tower and projector loaded from
    ``$ACCEL_CACHE_DIR/vlm/<cfg.key()>`` or trained by ``train_fn(vlm, tok, image_id, cfg, progress=...)`` and
    cached there. ``train_fn`` may return ``(record, extra)``: tensors saved beside the tower and projector (keys
    prefixed ``extra.``) that ``load_extra(vlm, extra)`` applies when the model is loaded from the cache (the training
    run has applied them itself)."""
    from safetensors.torch import load_file, save_file

    from ..models import load

    lm, tok = load("smollm2-135m")
    vlm, image_id = build(lm, tok, cfg)
    path = cache_path(cfg)
    wfile, rfile = path / "trainable.safetensors", path / "record.json"
    if wfile.exists() and rfile.exists() and not retrain:
        state = load_file(str(wfile))
        extra = {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")}
        _load_trainable(vlm, {k: v for k, v in state.items() if not k.startswith("extra.")})
        if extra:
            if load_extra is None:
                raise AccelError(f"the cached {what} at {path} holds tensors this loader cannot apply; retrain it")
            load_extra(vlm, extra)
        return vlm, tok, image_id, json.loads(rfile.read_text())
    logger.info("training the %s (project-trained; cached under %s)", what, path)
    record = train_fn(vlm, tok, image_id, cfg, progress=progress)
    extra = {}
    if isinstance(record, tuple):
        record, extra = record
    path.mkdir(parents=True, exist_ok=True)
    save_file({**_trainable_state(vlm), **{f"extra.{k}": v.detach().contiguous().clone() for k, v in extra.items()}},
              str(wfile))
    rfile.write_text(json.dumps(record, indent=1))
    return vlm.eval(), tok, image_id, record


def cache_path(cfg):
    from ..config import cache_dir

    return cache_dir() / "vlm" / cfg.key()


def load_or_train(cfg: DigitsConfig | None = None, retrain: bool = False, progress: bool = False):
    """The project-trained digits VLM: ``(vlm, tokenizer, image_token_id, record)``. Trains and caches it
    on first use (needs SmolLM2-135M, installed offline by ``scripts/setup.sh``)."""
    return cached_vlm(cfg or DigitsConfig(), build_vlm, train, progress, retrain, "digits VLM")


@torch.no_grad()
def evaluate(vlm, tok, image_id: int, cfg: DigitsConfig, n: int | None = None, batch: int = 50,
             seed: int = 1234) -> float:
    """Share of held-out digits whose greedy first answer token is the right digit (the model as it is
    patched now). Test images are rendered with a fixed seed, so every policy sees the same pictures."""
    _, _, xte, yte = digits_split(cfg)
    if n is not None:
        xte, yte = xte[:n], yte[:n]
    g = torch.Generator().manual_seed(seed)
    pv_all = render(xte, cfg, g)
    digit_ids = torch.tensor(digit_token_ids(tok))
    correct = 0
    for s in range(0, len(yte), batch):
        pv = pv_all[s:s + batch]
        ids = prompt_ids(tok, image_id, cfg.tokens, pv.shape[0])
        logits = vlm(input_ids=ids, pixel_values=pv, logits_to_keep=1).logits[:, -1]
        correct += int((logits.argmax(-1) == digit_ids[yte[s:s + batch]]).sum())
    return correct / len(yte)


@torch.no_grad()
def kept_on_digit(vlm, tok, image_id: int, cfg: DigitsConfig, n: int = 60, seed: int = 1234) -> dict:
    """Diagnostic for the model as it is patched now: the share of the kept visual tokens whose 4x4 patch
    contains digit ink (a pixel above 0.3), and the mean number of such patches per image, over the first
    ``n`` held-out digits (rendered as in ``evaluate``). Needs a visual policy patched on ``vlm``."""
    from ..api import get_handle

    h = get_handle(vlm)
    if h is None or not hasattr(h, "last"):
        raise AccelError("kept_on_digit needs a visual-token policy patched on the model (accel.patch(vlm, 'fastervlm', ...))")
    _, _, xte, _ = digits_split(cfg)
    pv = render(xte[:n], cfg, torch.Generator().manual_seed(seed))
    raw = pv[:, 0] * 0.5 + 0.5
    p = cfg.patch
    on = (raw.unfold(1, p, p).unfold(2, p, p) > 0.3).flatten(-2).any(-1).flatten(1)  # [n, tokens]
    vlm(input_ids=prompt_ids(tok, image_id, cfg.tokens, n), pixel_values=pv, logits_to_keep=1)
    kept = h.last["kept_indices"]
    return {"on_digit_share": float(torch.gather(on, 1, kept).float().mean()),
            "digit_patches_per_image": float(on.sum(1).float().mean())}
