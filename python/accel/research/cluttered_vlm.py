"""Cluttered digits: a project-trained pair of VLMs on a task whose answer depends on where things are.

On the single-digit VLM (``digits_vlm``) the class can be read from the background, so random pruning scores as
well as any method and a pruning benchmark cannot tell a good pruner from a bad one. Here every image holds four
digits and the question picks one of them:

* images: a 40x40 RGB canvas (10x10 = 100 patches of 4x4 pixels) with faint noise and coloured distractor strokes;
  four of scikit-learn's real handwritten digits (upscaled 2x: 16x16 pixels, 16 patches each), one per quadrant at a
  patch-aligned offset, each in a different colour (red, green, blue, yellow);
* questions: ``Which digit is red?`` (by colour) or ``Which digit is at the top left?`` (by position); the answer is
  the digit's single token. Only the asked digit's 16 patches (16% of the image) hold the answer, so a pruner that
  keeps 16 tokens must find them, and which ones depends on the question;
* the pair (same tokenizer, image processor and prompt, so one model's attention over the visual tokens ranks the
  other's): **large** = the digits VLM's architecture (CLIP tower width 64, 4 layers, the whole frozen SmolLM2-135M)
  trained on this task; **small** = a tower of width 48 with 3 layers over the first 8 of SmolLM2's 30 layers
  (frozen), about a quarter of the large model's compute per token.

Training (``load_or_train``, minutes on the 2-core CPU, cached under ``$ACCEL_CACHE_DIR/vlm``): stage A trains the
tower alone, its [CLS] output predicting every colour's and every quadrant's digit and each patch of the feature
layer predicting the digit and colour it belongs to; stage B trains the projector (and the tower at a tenth of the
rate) through the frozen language model on the answer token; an optional stage C (``lora_steps``) trains
low-rank adapters on the language model's attention projections with the projector, merged into its weights.
Held-out images are rendered from the held-out digits with a fixed seed. Every number from these models is a
**project-trained** model's, not a published VLM's.
"""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import AccelError
from .digits_vlm import IMAGE_TOKEN, cached_vlm, digit_token_ids, digits_split, train_projector

COLOURS = ("red", "green", "blue", "yellow")
_RGB = torch.tensor([[1.0, 0.15, 0.15], [0.15, 0.9, 0.15], [0.3, 0.4, 1.0], [1.0, 0.9, 0.1]])
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
PROMPT_PRE = "Image:"


def question(kind: str, which: str) -> str:
    if kind == "colour":
        return f"\nQuestion: Which digit is {which}? Answer:"
    return f"\nQuestion: Which digit is at the {which}? Answer:"


@dataclass
class ClutterConfig:
    canvas: int = 40
    patch: int = 4
    scale: int = 2
    noise: float = 0.1
    strokes: int = 10
    kinds: str = "colour,position"
    width: int = 64
    layers: int = 4
    heads: int = 4
    #: 0: the whole language model; n: only its first n decoder layers (the small model)
    lm_layers: int = 0
    n_train: int = 1400
    stage_a_steps: int = 1500
    stage_a_batch: int = 64
    stage_a_lr: float = 3e-3
    stage_b_steps: int = 240
    stage_b_batch: int = 16
    stage_b_lr: float = 1e-3
    #: stage C (after stage B aligned the projector): steps of low-rank adapters on the language model's attention
    #: projections, trained with the projector (at ``lora_proj_lr``) and the tower (a tenth of it); 0: frozen LM
    lora_steps: int = 0
    lora_rank: int = 16
    lora_lr: float = 5e-4
    lora_proj_lr: float = 3e-4
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    #: questions per training image in stages B and C (1: one, as at test time; up to 4: one turn per digit,
    #: LLaVA-Instruct style, every answer supervised)
    questions_per_image: int = 1
    seed: int = 0
    version: int = 1

    def __post_init__(self):
        if not 1 <= self.questions_per_image <= 4:
            raise AccelError(f"cluttered digits: questions_per_image must be 1-4 (one per digit), "
                             f"got {self.questions_per_image}")
        if self.lora_steps < 0 or (self.lora_steps and self.lora_rank <= 0):
            raise AccelError(f"cluttered digits: stage C needs lora_steps >= 0 and, when it runs, lora_rank > 0 "
                             f"(got lora_steps={self.lora_steps}, lora_rank={self.lora_rank})")

    @property
    def tokens(self) -> int:
        return (self.canvas // self.patch) ** 2

    @property
    def kind_list(self) -> list[str]:
        ks = [k for k in self.kinds.split(",") if k]
        if not ks or any(k not in ("colour", "position") for k in ks):
            raise AccelError(f"cluttered digits: kinds must name 'colour' and/or 'position', got {self.kinds!r}")
        return ks

    def key(self) -> str:
        lm = f"lm{self.lm_layers}" if self.lm_layers else "lmall"
        lora = ""
        if self.lora_steps:  # every stage C setting names the cache folder: a short digest of targets and rates
            digest = hashlib.sha1(f"{self.lora_targets}|{self.lora_lr}|{self.lora_proj_lr}".encode()).hexdigest()[:6]
            lora = f"-lora{self.lora_rank}x{self.lora_steps}-{digest}"
        lora += f"-q{self.questions_per_image}" if self.questions_per_image > 1 else ""
        return (f"clutter-vlm-v{self.version}-c{self.canvas}p{self.patch}w{self.width}l{self.layers}-{lm}{lora}"
                f"-{self.kinds.replace(',', '+')}-s{self.seed}")


def large_config(**kw) -> ClutterConfig:
    return ClutterConfig(**kw)


def small_config(**kw) -> ClutterConfig:
    base = dict(width=48, layers=3, heads=3, lm_layers=8)
    base.update(kw)
    return ClutterConfig(**base)


# -- data -------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    pixel_values: torch.Tensor  # [B, 3, canvas, canvas]
    kind: str
    which: list[str]  # the colour or position asked, per image
    answer: torch.Tensor  # [B] the asked digit
    target: torch.Tensor  # [B] which of the four digits is asked (its quadrant)
    quadrant_digit: torch.Tensor  # [B, 4] the digit in each quadrant
    quadrant_colour: torch.Tensor  # [B, 4] each quadrant's colour index
    patch_digit: torch.Tensor  # [B, tokens] the digit a patch belongs to, 10 for background
    patch_colour: torch.Tensor  # [B, tokens] its colour index, 4 for background


def render(images: torch.Tensor, labels: torch.Tensor, cfg: ClutterConfig, n: int, kind: str,
           g: torch.Generator) -> Batch:
    """``n`` cluttered canvases, each with four digits drawn from ``images`` / ``labels`` and one question of
    ``kind`` about one of them."""
    C, P, s = cfg.canvas, cfg.patch, 8 * cfg.scale
    half = C // 2
    if half < s:
        raise AccelError(f"cluttered digits: a canvas of {C} has no room for four {s}-pixel digits")
    g_span = (half - s) // P + 1
    img = cfg.noise * torch.rand(n, 3, C, C, generator=g)
    # distractor strokes: short horizontal / vertical / diagonal lines in the digits' colours, under the digits
    for i in range(n):
        for _ in range(cfg.strokes):
            col = _RGB[int(torch.randint(0, 4, (1,), generator=g))] * (0.5 + 0.5 * float(torch.rand(1, generator=g)))
            y, x = (int(v) for v in torch.randint(0, C, (2,), generator=g))
            L = int(torch.randint(4, 9, (1,), generator=g))
            dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][int(torch.randint(0, 4, (1,), generator=g))]
            for t in range(L):
                yy, xx = y + t * dy, x + t * dx
                if 0 <= yy < C and 0 <= xx < C:
                    img[i, :, yy, xx] = torch.maximum(img[i, :, yy, xx], col)
    pick = torch.randint(0, len(labels), (n, 4), generator=g)
    colours = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    offs = torch.randint(0, g_span, (n, 4, 2), generator=g) * P
    big = images.repeat_interleave(cfg.scale, 1).repeat_interleave(cfg.scale, 2)  # [N, s, s]
    g_side = C // P
    patch_digit = torch.full((n, g_side, g_side), 10, dtype=torch.long)
    patch_colour = torch.full((n, g_side, g_side), 4, dtype=torch.long)
    for i in range(n):
        for q in range(4):
            y0 = (q // 2) * half + int(offs[i, q, 0])
            x0 = (q % 2) * half + int(offs[i, q, 1])
            d = big[pick[i, q]]
            ink = d[None] * _RGB[colours[i, q]].view(3, 1, 1)
            region = img[i, :, y0:y0 + s, x0:x0 + s]
            img[i, :, y0:y0 + s, x0:x0 + s] = torch.where(d[None] > 0.15, ink, region)
            patch_digit[i, y0 // P:(y0 + s) // P, x0 // P:(x0 + s) // P] = labels[pick[i, q]]
            patch_colour[i, y0 // P:(y0 + s) // P, x0 // P:(x0 + s) // P] = colours[i, q]
    target = torch.randint(0, 4, (n,), generator=g)
    qd = labels[pick]
    which = [COLOURS[int(colours[i, target[i]])] if kind == "colour" else POSITIONS[int(target[i])] for i in range(n)]
    return Batch(pixel_values=((img - 0.5) / 0.5).contiguous(), kind=kind, which=which,
                 answer=qd.gather(1, target[:, None])[:, 0], target=target, quadrant_digit=qd,
                 quadrant_colour=colours, patch_digit=patch_digit.flatten(1), patch_colour=patch_colour.flatten(1))


def prompt_ids(tok, image_id: int, n_tokens: int, kind: str, which: list[str]) -> torch.Tensor:
    """The prompts of one batch (one question kind, so one length): ``Image:<image tokens>`` and the question,
    ending with the space before the answer digit."""
    pre = tok(PROMPT_PRE, add_special_tokens=False)["input_ids"]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    rows = [pre + [image_id] * n_tokens + tok(question(kind, w), add_special_tokens=False)["input_ids"] + space
            for w in which]
    if len({len(r) for r in rows}) != 1:
        raise AccelError(f"cluttered digits: the {kind} questions of one batch tokenize to different lengths")
    return torch.tensor(rows)


def conversation_ids(tok, image_id: int, n_tokens: int, b: Batch, kinds: list[str], order: torch.Tensor):
    """Training prompts with several questions per image, LLaVA-Instruct style: ``Image:<image tokens>`` and then,
    for ``j`` in ``range(len(kinds))``, the question of kind ``kinds[j]`` about quadrant ``order[:, j]`` followed by
    its answer digit. Returns ``(input_ids [B, T], positions [Q], answers [B, Q])``: the logits at ``positions``
    predict the answer digits (the first question and its position are exactly ``prompt_ids``'s). One kind sequence
    for the whole batch keeps every row one length."""
    digit_ids = digit_token_ids(tok)
    pre = tok(PROMPT_PRE, add_special_tokens=False)["input_ids"]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    rows, answers, positions = [], [], None
    for i in range(b.pixel_values.shape[0]):
        row, pos, ans = pre + [image_id] * n_tokens, [], []
        for j, kind in enumerate(kinds):
            q = int(order[i, j])
            which = COLOURS[int(b.quadrant_colour[i, q])] if kind == "colour" else POSITIONS[q]
            row += tok(question(kind, which), add_special_tokens=False)["input_ids"] + space
            pos.append(len(row) - 1)
            d = int(b.quadrant_digit[i, q])
            row.append(digit_ids[d])
            ans.append(d)
        if positions is None:
            positions = pos
        elif pos != positions:
            raise AccelError("cluttered digits: the questions of one training batch tokenize to different lengths")
        rows.append(row)
        answers.append(ans)
    return torch.tensor(rows), torch.tensor(positions), torch.tensor(digit_ids)[torch.tensor(answers)]


def test_batches(cfg: ClutterConfig, n: int | None = None, batch: int = 50, seed: int = 1234):
    """The held-out evaluation set, the same for every policy: ``n`` images per question kind (default: as many as
    held-out digits), rendered from the held-out digits with a fixed seed, in batches of ``batch``."""
    _, _, xte, yte = digits_split(cfg)
    n = len(yte) if n is None else n
    out = []
    for ki, kind in enumerate(cfg.kind_list):
        g = torch.Generator().manual_seed(seed + ki)
        for s in range(0, n, batch):
            out.append(render(xte, yte, cfg, min(batch, n - s), kind, g))
    return out


# -- the model --------------------------------------------------------------------------------------------
def build_vlm(lm, tok, cfg: ClutterConfig):
    """A ``LlavaForConditionalGeneration`` around the frozen causal LM ``lm`` (its first ``cfg.lm_layers`` decoder
    layers if set), with a fresh CLIP tower for RGB canvases and LLaVA's projector. Returns ``(vlm, image_id)``."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tok.unk_token_id:
        raise AccelError(f"the tokenizer has no {IMAGE_TOKEN!r} token to use as the image placeholder")
    text_cfg = copy.deepcopy(lm.config)
    nl = lm.config.num_hidden_layers
    if cfg.lm_layers:
        if cfg.lm_layers > nl:
            raise AccelError(f"cluttered digits: lm_layers={cfg.lm_layers} exceeds the language model's {nl} layers")
        text_cfg.num_hidden_layers = cfg.lm_layers
        if getattr(text_cfg, "layer_types", None) is not None:
            text_cfg.layer_types = list(text_cfg.layer_types)[: cfg.lm_layers]
    vcfg = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=2 * cfg.width, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, image_size=cfg.canvas, patch_size=cfg.patch, num_channels=3)
    torch.manual_seed(cfg.seed)
    lcfg = LlavaConfig(vision_config=vcfg, text_config=text_cfg, image_token_id=image_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=lm.config.tie_word_embeddings)
    vlm = LlavaForConditionalGeneration(lcfg)
    keep = text_cfg.num_hidden_layers
    state = {k: v for k, v in lm.model.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < keep}
    vlm.model.language_model.load_state_dict(state)
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight if lm.config.tie_word_embeddings else \
        torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    for p in vlm.model.language_model.parameters():
        p.requires_grad_(False)
    vlm.lm_head.weight.requires_grad_(False)
    vlm.set_attn_implementation("sdpa")
    return vlm.eval(), image_id


# -- the language model's adapters --------------------------------------------------------------------------
def _lora_modules(vlm, cfg: ClutterConfig) -> dict:
    """``{path: Linear}``: the language model's projections stage C adapts (``cfg.lora_targets``)."""
    names = [t for t in cfg.lora_targets.split(",") if t]
    lm = vlm.model.language_model
    found = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names}
    if not found:
        raise AccelError(f"cluttered digits: no language-model projection named {names}")
    return found


def _attach_lora(vlm, cfg: ClutterConfig):
    """Low-rank adapters on the frozen language model (LoRA, Hu et al., ICLR 2022): each targeted projection's output
    gains ``B @ A @ x`` (``A`` random, ``B`` zero, so training starts from the frozen model). Returns the factors
    ``{path.A / path.B: Parameter}`` and the hook handles."""
    factors, handles = {}, []
    g = torch.Generator().manual_seed(cfg.seed + 7)
    for path, lin in _lora_modules(vlm, cfg).items():
        a = torch.nn.Parameter(torch.randn(cfg.lora_rank, lin.in_features, generator=g) / lin.in_features ** 0.5)
        b = torch.nn.Parameter(torch.zeros(lin.out_features, cfg.lora_rank))
        factors[f"{path}.A"], factors[f"{path}.B"] = a, b

        def hook(mod, args, out, a=a, b=b):
            return out + torch.nn.functional.linear(torch.nn.functional.linear(args[0], a), b)

        handles.append(lin.register_forward_hook(hook))
    return factors, handles


def merge_lora(vlm, factors: dict) -> None:
    """Fold trained adapters into the language model's weights (``W += B @ A``): the model is then a plain
    transformers LLaVA model whose language model is SmolLM2 with these deltas."""
    lm = vlm.model.language_model
    mods = dict(lm.named_modules())
    paths = sorted({k.rsplit(".", 1)[0] for k in factors})
    for path in paths:
        lin = mods.get(path)
        if not isinstance(lin, torch.nn.Linear):
            raise AccelError(f"cluttered digits: the cached adapters name {path!r}, which this language model lacks")
        if f"{path}.A" not in factors or f"{path}.B" not in factors:
            raise AccelError(f"cluttered digits: the cached adapters of {path!r} lack their A or B factor; retrain")
        with torch.no_grad():
            lin.weight += (factors[f"{path}.B"].to(torch.float32) @ factors[f"{path}.A"].to(torch.float32)).to(
                lin.weight.dtype)


# -- training ---------------------------------------------------------------------------------------------
def train(vlm, tok, image_id: int, cfg: ClutterConfig, progress: bool = False) -> tuple[dict, dict]:
    """Stage A: the tower alone ([CLS] predicts every colour's and quadrant's digit; every feature-layer patch its
    digit and colour). Stage B: projector + tower through the frozen LM on the answer token. Stage C (when
    ``cfg.lora_steps``): ``tune_language_model``. Returns ``(record, adapters)`` (``{}`` without stage C)."""
    from tqdm.auto import tqdm

    xtr, ytr, _, _ = digits_split(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    kinds = cfg.kind_list
    tower = vlm.model.vision_tower
    W = cfg.width
    cls_head = torch.nn.Linear(W, 80)  # 4 colours x 10 digits, then 4 quadrants x 10 digits
    patch_head = torch.nn.Linear(W, 11 + 5)
    record: dict = {"config": asdict(cfg)}
    t0 = time.time()
    params = list(tower.parameters()) + list(cls_head.parameters()) + list(patch_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage_a_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.stage_a_lr, total_steps=cfg.stage_a_steps, pct_start=0.1)
    tower.train()
    bar = tqdm(total=cfg.stage_a_steps, desc=f"cluttered VLM {cfg.key()} stage A (tower)", disable=not progress)
    accs, patch_accs = [], []
    for step in range(cfg.stage_a_steps):
        b = render(xtr, ytr, cfg, cfg.stage_a_batch, kinds[step % len(kinds)], g)
        out = tower(b.pixel_values, output_hidden_states=True)
        cl = cls_head(out.pooler_output).view(-1, 8, 10)
        by_colour = torch.empty_like(b.quadrant_digit)
        by_colour.scatter_(1, b.quadrant_colour, b.quadrant_digit)  # colour c's digit
        tgt = torch.cat([by_colour, b.quadrant_digit], 1)
        feat = out.hidden_states[-2][:, 1:]
        ph = patch_head(feat)
        loss = (torch.nn.functional.cross_entropy(cl.reshape(-1, 10), tgt.reshape(-1))
                + torch.nn.functional.cross_entropy(ph[..., :11].reshape(-1, 11), b.patch_digit.reshape(-1))
                + torch.nn.functional.cross_entropy(ph[..., 11:].reshape(-1, 5), b.patch_colour.reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        accs.append(float((cl.argmax(-1) == tgt).float().mean()))
        on_digit = b.patch_digit < 10
        patch_accs.append(float((ph[..., :10].argmax(-1)[on_digit] == b.patch_digit[on_digit]).float().mean()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", cls_acc=f"{sum(accs[-10:]) / len(accs[-10:]):.3f}")
    bar.close()
    record["stage_a_cls_acc_last_10_steps"] = round(sum(accs[-10:]) / len(accs[-10:]), 4)
    # how well a digit's own patches name it (their feature-layer outputs, the tokens the language model reads)
    record["stage_a_patch_digit_acc_last_10_steps"] = round(sum(patch_accs[-10:]) / len(patch_accs[-10:]), 4)
    record["stage_a_seconds"] = round(time.time() - t0, 1)
    t1 = time.time()
    losses, hits = train_projector(vlm, cfg, _stage_batches(tok, image_id, cfg, g),
                                   f"cluttered VLM {cfg.key()} stage B (projector)", progress, 10)
    record["stage_b_loss_first_last"] = [round(losses[0], 4), round(sum(losses[-10:]) / 10, 4)]
    record["stage_b_train_acc_last_20_steps"] = round(sum(hits[-20:]) / len(hits[-20:]), 4)
    record["stage_b_seconds"] = round(time.time() - t1, 1)
    factors: dict = {}
    if cfg.lora_steps:
        rec_c, factors = tune_language_model(vlm, tok, image_id, cfg, progress=progress, g=g)
        record.update(rec_c)
    record["seconds"] = round(time.time() - t0, 1)
    return record, factors


def _stage_batches(tok, image_id: int, cfg: ClutterConfig, g: torch.Generator):
    """``batch(step)`` for stages B and C: one question per image, or ``cfg.questions_per_image`` turns (the
    batch's own question first, then other quadrants in a random order, each turn's kind drawn at random)."""
    xtr, ytr, _, _ = digits_split(cfg)
    kinds = cfg.kind_list
    digit_ids = torch.tensor(digit_token_ids(tok))
    n_q = cfg.questions_per_image

    def batch(step):
        b = render(xtr, ytr, cfg, cfg.stage_b_batch, kinds[step % len(kinds)], g)
        if n_q == 1:
            return prompt_ids(tok, image_id, cfg.tokens, b.kind, b.which), b.pixel_values, digit_ids[b.answer]
        seq = [b.kind] + [kinds[int(k)] for k in torch.randint(0, len(kinds), (n_q - 1,), generator=g)]
        order = []
        for t in b.target.tolist():
            rest = [q for q in torch.randperm(4, generator=g).tolist() if q != t]
            order.append([t] + rest[:n_q - 1])
        ids, pos, ans = conversation_ids(tok, image_id, cfg.tokens, b, seq, torch.tensor(order))
        return ids, b.pixel_values, (pos, ans)

    return batch


def tune_language_model(vlm, tok, image_id: int, cfg: ClutterConfig, progress: bool = False,
                        g: torch.Generator | None = None) -> tuple[dict, dict]:
    """Stage C on a VLM whose projector stage B has aligned: ``cfg.lora_steps`` steps of low-rank adapters on the
    language model's attention projections (LLaVA's second stage tunes the language model; adapters keep it to
    minutes here), with the projector at ``cfg.lora_proj_lr`` and the tower at a tenth of it. It follows stage B as
    LLaVA's second stage follows its projector alignment, so the adapters do not start on a language model fed a
    random projector's output. The adapters are merged into the language model's weights; returns
    ``(record, adapters)``."""
    if not cfg.lora_steps:
        raise AccelError("cluttered digits: stage C needs lora_steps > 0")
    g = torch.Generator().manual_seed(cfg.seed + 2) if g is None else g
    t0 = time.time()
    factors, handles = _attach_lora(vlm, cfg)
    try:
        losses, hits = train_projector(vlm, cfg, _stage_batches(tok, image_id, cfg, g),
                                       f"cluttered VLM {cfg.key()} stage C (LM adapters)", progress, 10,
                                       extra=(list(factors.values()), cfg.lora_lr), steps=cfg.lora_steps,
                                       lr=cfg.lora_proj_lr)
    finally:
        for h in handles:
            h.remove()
    factors = {k: v.detach().clone() for k, v in factors.items()}
    merge_lora(vlm, factors)
    return {"stage_c_loss_first_last": [round(losses[0], 4), round(sum(losses[-10:]) / 10, 4)],
            "stage_c_train_acc_last_20_steps": round(sum(hits[-20:]) / len(hits[-20:]), 4),
            "stage_c_seconds": round(time.time() - t0, 1)}, factors


def load_or_train(cfg: ClutterConfig, retrain: bool = False, progress: bool = False):
    """A project-trained cluttered-digits VLM: ``(vlm, tokenizer, image_token_id, record)``. Trains and caches it
    on first use (needs SmolLM2-135M, installed offline by ``scripts/setup.sh``)."""
    return cached_vlm(cfg, build_vlm, train, progress, retrain, f"cluttered-digits VLM {cfg.key()}",
                      load_extra=merge_lora)


@torch.no_grad()
def answers(vlm, tok, image_id: int, cfg: ClutterConfig, batches) -> dict:
    """The model as it is patched now, on ``batches`` (``test_batches``): per image the greedy answer digit among
    the ten digit tokens, its probability among them, the right answer and the question kind."""
    digit_ids = torch.tensor(digit_token_ids(tok))
    pred, conf, gold, kinds = [], [], [], []
    for b in batches:
        ids = prompt_ids(tok, image_id, cfg.tokens, b.kind, b.which)
        logits = vlm(input_ids=ids, pixel_values=b.pixel_values, logits_to_keep=1).logits[:, -1]
        p = torch.softmax(logits[:, digit_ids].float(), -1)
        c, a = p.max(-1)
        full_pred = logits.argmax(-1)
        # an answer outside the digits counts as wrong (-1)
        pred.append(torch.where(full_pred == digit_ids[a], a, torch.full_like(a, -1)))
        conf.append(c)
        gold.append(b.answer)
        kinds += [b.kind] * len(b.answer)
    return {"pred": torch.cat(pred), "conf": torch.cat(conf), "gold": torch.cat(gold), "kind": kinds}


def accuracy(res: dict, kind: str | None = None) -> float:
    sel = torch.tensor([kind is None or k == kind for k in res["kind"]])
    return float((res["pred"][sel] == res["gold"][sel]).float().mean())
