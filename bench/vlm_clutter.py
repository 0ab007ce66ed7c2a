"""The cluttered-digits VLM pair (project-trained) and visual-token pruning on a task where it matters.

Every image holds four coloured digits and the question asks for one (by colour or by position), so only the
asked digit's 16 of the 100 visual tokens hold the answer. The models are accel's own
(``accel.research.cluttered_vlm``): CLIP towers trained from scratch here and the frozen SmolLM2-135M (all 30 layers
for the large model, its first 8 for the small one). Their numbers are a **project-trained** pair's, not a published
VLM's.

    python bench/vlm_clutter.py train                  # both models, cached (about 30 min on 2 cores: 21 + 8)
    python bench/vlm_clutter.py curve --out bench/results/vlm_clutter_curve.csv
    python bench/vlm_clutter.py see --out bench/results/vlm_clutter_see.csv
    python bench/vlm_clutter.py diagnose --out bench/results/vlm_clutter_on_target.csv
    python bench/vlm_clutter.py ceiling --out bench/results/vlm_clutter_ceiling.csv
    python bench/vlm_clutter.py lm-tuning --out bench/results/vlm_clutter_lm_tuning.csv   # ~13 min

``lm-tuning``: stage C (low-rank adapters on the language model, after stage B) on the small model: its held-out
accuracy with the frozen language model and after each of ``--lora-steps`` (trains and caches the small model first
if it is not cached). Every command writes its CSV to ``--out`` (default: the committed file in bench/results).

``curve``: the large model's accuracy against kept visual tokens for each policy (``sgl`` guided by the small model),
one row per (policy, kept tokens), and a PNG. ``see``: SGL's early exit at several thresholds: the share of questions
the small model answers alone, the accuracy, and the time per answer including the small model, against the large
model alone. ``diagnose``: the share of each policy's kept tokens that lie on the asked digit. ``ceiling``: how well
the frozen language models answer the same held-out questions, zero-shot, when the image's four digits are written out
for them as text (each with its colour and position; their choice among the ten digits), against the VLMs (whose
answer counts as wrong when it is not a digit) and a uniform pick among the image's four digits.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

MODEL = "project-trained cluttered-digits VLM pair (CLIP towers from scratch + SmolLM2-135M frozen)"


def _write(rows, out: Path):
    from accel.perf import machine_facts

    facts = machine_facts()
    rows = [{**r, **facts} for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _spec(pol: str, small):
    """(policy name, options) for a curve entry: ``sgl`` gets the small model as its guide."""
    name, *opts = pol.split("@")
    kw = {}
    for o in opts:
        k, v = o.split("=")
        kw[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    if name == "sgl":
        kw["guide"] = small
    return name, kw


def _asked_digit_tokens(b) -> torch.Tensor:
    """[B, tokens] bool: the asked digit's patches (its quadrant's digit patches)."""
    side = int(b.patch_digit.shape[1] ** 0.5)
    half = side // 2
    grid = b.patch_digit.view(-1, side, side) < 10
    q = torch.zeros_like(grid)
    for i, t in enumerate(b.target.tolist()):
        qy, qx = divmod(t, 2)
        q[i, qy * half:(qy + 1) * half, qx * half:(qx + 1) * half] = True
    return (grid & q).flatten(1)


@torch.no_grad()
def _forward_kept(vlm, ids, pixel_values, keep, image_id) -> torch.Tensor:
    """Last-position logits of the unpatched VLM fed only the image tokens ``keep`` marks ([B, tokens], the same
    count per row), at their original positions (as the visual policies feed the language model)."""
    feats = torch.stack(list(vlm.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output))
    img = ids == image_id
    cols = torch.ones_like(img)
    cols[img] = keep.reshape(-1)
    B = ids.shape[0]
    emb = vlm.get_input_embeddings()(ids)
    emb[img] = feats.reshape(-1, feats.shape[-1]).to(emb.dtype)
    emb = emb[cols].view(B, -1, emb.shape[-1])
    pos = torch.arange(ids.shape[1]).expand(B, -1)[cols].view(B, -1)
    hs = vlm.model.language_model(inputs_embeds=emb, position_ids=pos).last_hidden_state
    return vlm.lm_head(hs[:, -1])


FORMATS = {
    # each digit's facts as a list, then as sentences; the question is the VLM's own
    "list": lambda facts: "Image: " + ", ".join(f"{c} {p}: {d}" for c, p, d in facts) + ".",
    "sentences": lambda facts: "Image: " + " ".join(f"The {c} digit at the {p} is {d}." for c, p, d in facts),
}


@torch.no_grad()
def _text_choice(lm, tok, prompts: list[str]) -> torch.Tensor:
    """The digit (0-9) each prompt's most likely continuation `` d`` names: the ten candidates' log-probabilities
    under ``lm`` (one forward when the candidates share a prefix and differ in one last token, as with SmolLM2's
    and Gemma's single-digit tokens; otherwise each candidate in full)."""
    out = []
    for p in prompts:
        base = tok(p, add_special_tokens=True)["input_ids"]
        cands = [tok(f"{p} {d}", add_special_tokens=True)["input_ids"] for d in range(10)]
        if any(c[:len(base)] != base for c in cands):
            raise RuntimeError(f"the tokenizer does not extend {p[-20:]!r} by its answer; cannot score it")
        tails = [c[len(base):] for c in cands]
        if all(len(t) == len(tails[0]) and t[:-1] == tails[0][:-1] for t in tails):
            ids = torch.tensor([base + tails[0][:-1]])
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, -1].float(), -1)
            scores = torch.stack([logp[t[-1]] for t in tails])
        else:
            scores = []
            for t in tails:
                ids = torch.tensor([base + t])
                logp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
                scores.append(sum(logp[len(base) - 1 + i, tok_id] for i, tok_id in enumerate(t)))
            scores = torch.stack(scores)
        out.append(int(scores.argmax()))
    return torch.tensor(out)


def _ceiling(args, large, small, tok, image_id, cfg, batches):
    """The frozen language models on the held-out questions with the image written out as text, next to the VLMs
    and a uniform pick among the image's four digits (``ceiling`` in the module doc)."""
    from tqdm.auto import tqdm

    from accel.models import load
    from accel.research import cluttered_vlm as C

    gold = torch.cat([b.answer for b in batches])
    quad = torch.cat([b.quadrant_digit for b in batches])
    kinds = [b.kind for b in batches for _ in b.answer]
    n_q = len(gold)

    def row(source, fmt, pred):
        pred = torch.as_tensor(pred)
        acc = float((pred == gold).float().mean())
        present = float((pred[:, None] == quad).any(1).float().mean())
        per = {f"accuracy_{k}": round(float((pred == gold)[torch.tensor([x == k for x in kinds])].float().mean()), 4)
               for k in cfg.kind_list}
        print(f"{source} ({fmt}): accuracy {acc:.3f}, answers one of the image's digits {present:.3f}", flush=True)
        return {"source": source, "input": fmt, "accuracy": round(acc, 4), **per,
                "answer_is_a_digit_in_the_image": round(present, 4), "questions": n_q}

    rows = []
    # a uniform pick among the four digits: right with probability (copies of the answer) / 4
    uniform = float(((quad == gold[:, None]).float().mean(1)).mean())
    rows.append({"source": "uniform pick among the image's four digits", "input": "", "accuracy": round(uniform, 4),
                 **{f"accuracy_{k}": "" for k in cfg.kind_list}, "answer_is_a_digit_in_the_image": 1.0,
                 "questions": n_q})
    print(f"uniform pick among the image's four digits: accuracy {uniform:.3f}")
    for name, m in (("large VLM", large), ("small VLM", small)):
        res = C.answers(m, tok, image_id, cfg, batches)
        rows.append(row(name, "image (100 visual tokens)", res["pred"]))
    for lm_name in [x for x in args.lms.split(",") if x]:
        lm, ltok = load(lm_name)
        for fmt, render in FORMATS.items():
            prompts = []
            for b in batches:
                for i in range(len(b.answer)):
                    facts = [(C.COLOURS[int(b.quadrant_colour[i, q])], C.POSITIONS[q], int(b.quadrant_digit[i, q]))
                             for q in range(4)]
                    prompts.append(render(facts) + C.question(b.kind, b.which[i]))
            pred = _text_choice(lm, ltok, tqdm(prompts, desc=f"{lm_name} on text ({fmt})", leave=False))
            rows.append(row(f"{lm_name} (frozen, text only)", f"the image's digits as text ({fmt})", pred))
        del lm
    _write(rows, Path(args.out or "bench/results/vlm_clutter_ceiling.csv"))
    print(f"wrote {args.out or 'bench/results/vlm_clutter_ceiling.csv'}")


def _lm_tuning(args):
    """Stage C (low-rank adapters on the language model, after stage B) on the small model of the pair: the held-out
    accuracy of the frozen-LM model against the same model after ``--lora-steps`` of stage C, and against a uniform
    pick among the image's four digits (what a reader that ignores the question scores)."""
    import copy

    from accel.research import cluttered_vlm as C

    scfg = C.small_config()
    small, tok, image_id, srec = C.load_or_train(scfg, progress=True)
    batches = C.test_batches(scfg, n=args.samples)
    n_q = sum(len(b.answer) for b in batches)
    uniform = float(sum(float((b.quadrant_digit == b.answer[:, None]).float().sum()) / 4 for b in batches) / n_q)

    def row(name, steps, res, rec, secs):
        return {"model": f"small, {name}", "stage_c_steps": steps,
                "questions_per_image": args.questions if steps else 1,
                "accuracy": round(C.accuracy(res), 4),
                **{f"accuracy_{k}": round(C.accuracy(res, k), 4) for k in scfg.kind_list},
                "uniform_pick_among_four": round(uniform, 4), "questions": n_q,
                "train_loss_last": rec.get("stage_c_loss_first_last", rec.get("stage_b_loss_first_last"))[1],
                "train_seconds": secs,
                "vlm": MODEL if not steps else MODEL.replace("frozen", "with stage C's adapters merged")}

    rows = [row("frozen LM (stages A+B)", 0, C.answers(small, tok, image_id, scfg, batches), srec,
                srec.get("seconds"))]
    print(f"frozen LM: accuracy {rows[-1]['accuracy']:.3f} (uniform pick among four {uniform:.3f})", flush=True)
    for steps in args.lora_steps:
        cfg = C.small_config(lora_steps=steps, questions_per_image=args.questions)
        tuned = copy.deepcopy(small)
        rec, _ = C.tune_language_model(tuned, tok, image_id, cfg, progress=True)
        rows.append(row(f"+ stage C ({steps} steps of LM adapters, rank {cfg.lora_rank})", steps,
                        C.answers(tuned, tok, image_id, scfg, batches), rec, rec["stage_c_seconds"]))
        print(f"stage C {steps} steps: accuracy {rows[-1]['accuracy']:.3f}", flush=True)
        del tuned
    out = Path(args.out or "bench/results/vlm_clutter_lm_tuning.csv")
    _write(rows, out)
    print(f"wrote {out}")


def main(argv=None):
    import accel
    from accel.research import cluttered_vlm as C

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "curve", "see", "diagnose", "ceiling", "lm-tuning"])
    ap.add_argument("--lms", default="smollm2-135m,gemma3-270m", help="ceiling: the language models to ask in text")
    ap.add_argument("--retrain", action="store_true", help="train: train both models again even if cached")
    ap.add_argument("--policies", default="sgl,sgl@layer=0,fastervlm,flowcut,fastv,randomprune")
    ap.add_argument("--keeps", default="16,8,4")
    ap.add_argument("--thresholds", default="0.2,0.25,0.3,0.35,0.4,0.5,0.7")
    ap.add_argument("--samples", type=int, default=200, help="held-out images per question kind")
    ap.add_argument("--see-keep", type=int, default=None, help="SGP's kept tokens beside SEE (default: keep all)")
    ap.add_argument("--lora-steps", default="300",
                    help="lm-tuning: stage C lengths to try on the small model, comma-separated (default 300)")
    ap.add_argument("--questions", type=int, default=1,
                    help="lm-tuning: questions per training image in stage C, 1-4 (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    if args.command == "lm-tuning":
        try:
            args.lora_steps = [int(x) for x in args.lora_steps.split(",") if x]
        except ValueError:
            ap.error(f"--lora-steps takes whole step counts, comma-separated; got {args.lora_steps!r}")
        if not args.lora_steps or min(args.lora_steps) < 1 or not 1 <= args.questions <= 4:
            ap.error("--lora-steps needs positive step counts and --questions a number from 1 to 4")
        return _lm_tuning(args)

    lcfg, scfg = C.large_config(), C.small_config()
    t0 = time.time()
    large, tok, image_id, lrec = C.load_or_train(lcfg, retrain=args.retrain and args.command == "train", progress=True)
    small, _, _, srec = C.load_or_train(scfg, retrain=args.retrain and args.command == "train", progress=True)
    print(f"cluttered-digits VLM pair (project-trained) ready in {time.time() - t0:.0f}s")
    print(f"large: {json.dumps(lrec)}\nsmall: {json.dumps(srec)}")
    batches = C.test_batches(lcfg, n=args.samples)
    n_q = sum(len(b.answer) for b in batches)
    n_tok = lcfg.tokens
    if args.command == "train":
        for name, m in (("large", large), ("small", small)):
            res = C.answers(m, tok, image_id, lcfg, batches)
            print(f"{name}: accuracy {C.accuracy(res):.3f} "
                  + " ".join(f"{k} {C.accuracy(res, k):.3f}" for k in lcfg.kind_list))
        return
    if args.command == "curve":
        rows = []
        full = {}
        for name, m in (("large", large), ("small", small)):
            t = time.time()
            res = C.answers(m, tok, image_id, lcfg, batches)
            full[name] = C.accuracy(res)
            rows.append({"policy": f"{name} model, all tokens", "keep": n_tok, "tokens": n_tok,
                         "accuracy": round(full[name], 4),
                         **{f"accuracy_{k}": round(C.accuracy(res, k), 4) for k in lcfg.kind_list},
                         "questions": n_q, "seconds": round(time.time() - t, 1), "model": MODEL})
            print(f"{name} model, all {n_tok} tokens: accuracy {full[name]:.3f}", flush=True)
        jobs = [(p, int(k)) for p in args.policies.split(",") if p for k in args.keeps.split(",")]
        for pol, k in tqdm(jobs, desc="accuracy vs kept tokens"):
            name, kw = _spec(pol, small)
            with accel.patch(large, name, keep=k, **kw):
                t = time.time()
                res = C.answers(large, tok, image_id, lcfg, batches)
            acc = C.accuracy(res)
            rows.append({"policy": pol, "keep": k, "tokens": n_tok, "accuracy": round(acc, 4),
                         **{f"accuracy_{kd}": round(C.accuracy(res, kd), 4) for kd in lcfg.kind_list},
                         "questions": n_q, "seconds": round(time.time() - t, 1), "model": MODEL})
            tqdm.write(f"{pol} keep {k}: accuracy {acc:.3f}")
        out = Path(args.out or "bench/results/vlm_clutter_curve.csv")
        _write(rows, out)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for pol in dict.fromkeys(r["policy"] for r in rows if r["keep"] != n_tok or "model" not in r["policy"]):
            pts = sorted((r["keep"], r["accuracy"]) for r in rows if r["policy"] == pol)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
        ax.axhline(full["large"], color="gray", ls="--", lw=1, label=f"large model, all {n_tok} tokens")
        ax.axhline(full["small"], color="gray", ls="-.", lw=1, label="small model, all tokens")
        ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens kept per image (of 100)")
        ax.set_ylabel(f"accuracy ({n_q} held-out questions)")
        ax.set_title("project-trained cluttered-digits VLM (large): accuracy vs kept tokens", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return
    if args.command == "diagnose":
        rows = []
        for pol in [p for p in args.policies.split(",") if p]:
            for k in [int(x) for x in args.keeps.split(",")]:
                name, kw = _spec(pol, small)
                on = tot = covered = 0
                with accel.patch(large, name, keep=k, **kw) as h, torch.no_grad():
                    for b in batches:
                        ids = C.prompt_ids(tok, image_id, n_tok, b.kind, b.which)
                        large(input_ids=ids, pixel_values=b.pixel_values, logits_to_keep=1)
                        kept = h.last["kept_indices"]
                        target = _asked_digit_tokens(b)
                        hit = torch.gather(target, 1, kept)
                        on += int(hit.sum())
                        covered += int((hit.sum(1) >= 2).sum())
                        tot += kept.numel()
                rows.append({"policy": pol, "keep": k, "on_asked_digit_share": round(on / tot, 4),
                             "two_or_more_on_asked_digit": round(covered / n_q, 4),
                             "asked_digit_tokens": 16, "tokens": n_tok, "questions": n_q, "accuracy": ""})
                print(f"{pol} keep {k}: {on / tot:.3f} of kept tokens on the asked digit; {covered / n_q:.3f} of the "
                      "questions keep two or more of its tokens", flush=True)
        # where the large model reads the answer: only the asked digit's 16 tokens, or 16 random tokens off it
        digit_ids = torch.tensor(C.digit_token_ids(tok))
        g = torch.Generator().manual_seed(0)
        for name in ("only the asked digit's tokens", "16 random tokens off the asked digit"):
            right = 0
            for b in batches:
                target = _asked_digit_tokens(b)
                if name.startswith("only"):
                    keep = target
                else:
                    keep = torch.zeros_like(target)
                    for i in range(len(keep)):
                        off = (~target[i]).nonzero()[:, 0]
                        keep[i, off[torch.randperm(len(off), generator=g)[:16]]] = True
                ids = C.prompt_ids(tok, image_id, n_tok, b.kind, b.which)
                logits = _forward_kept(large, ids, b.pixel_values, keep, image_id)
                right += int((logits.argmax(-1) == digit_ids[b.answer]).sum())
            acc = right / n_q
            rows.append({"policy": name, "keep": 16, "on_asked_digit_share": 1.0 if name.startswith("only") else 0.0,
                         "two_or_more_on_asked_digit": 1.0 if name.startswith("only") else 0.0, "asked_digit_tokens": 16, "tokens": n_tok, "questions": n_q, "accuracy": round(acc, 4)})
            print(f"{name}: accuracy {acc:.3f}", flush=True)
        _write(rows, Path(args.out or "bench/results/vlm_clutter_on_target.csv"))
        return
    if args.command == "ceiling":
        _ceiling(args, large, small, tok, image_id, lcfg, batches)
        return
    # see: early exit at several thresholds, answers through generate (one new token: the digit)
    digit_ids = torch.tensor(C.digit_token_ids(tok))

    def run(patch_kw):
        right = exited = 0
        t = time.time()
        for b in batches:
            ids = C.prompt_ids(tok, image_id, n_tok, b.kind, b.which)
            if patch_kw is None:
                with torch.no_grad():
                    g = large.generate(input_ids=ids, pixel_values=b.pixel_values, max_new_tokens=1, do_sample=False)
            else:
                with accel.patch(large, "sgl", **patch_kw) as h, torch.no_grad():
                    g = large.generate(input_ids=ids, pixel_values=b.pixel_values, max_new_tokens=1, do_sample=False)
                    exited += sum(h.last_exit["exited"])
            right += int((g[:, -1] == digit_ids[b.answer]).sum())
        return right / n_q, exited / n_q, (time.time() - t) / n_q

    rows = []
    keep = args.see_keep or n_tok
    # warm-up (not timed): one batch through each path, so that the first timed run does not pay for it
    b = batches[0]
    ids = C.prompt_ids(tok, image_id, n_tok, b.kind, b.which)
    with torch.no_grad():
        large.generate(input_ids=ids, pixel_values=b.pixel_values, max_new_tokens=1, do_sample=False)
        with accel.patch(large, "sgl", guide=small, keep=keep, exit_threshold=0.5):
            large.generate(input_ids=ids, pixel_values=b.pixel_values, max_new_tokens=1, do_sample=False)
    acc, _, sec = run(None)
    print(f"large model alone: accuracy {acc:.3f}, {1000 * sec:.1f} ms per answer", flush=True)
    base = sec
    thresholds = [float(x) for x in args.thresholds.split(",")] + [2.0]
    results = []
    for thr in tqdm(thresholds, desc="early-exit thresholds"):
        results.append(run({"guide": small, "keep": keep, "exit_threshold": thr}))
    _, _, sec2 = run(None)  # the baseline again, after: its mean is the reference
    print(f"large model alone, again: {1000 * sec2:.1f} ms per answer", flush=True)
    base = (sec + sec2) / 2
    rows.append({"setting": "large model alone", "threshold": "", "keep": n_tok, "exit_rate": 0.0,
                 "accuracy": round(acc, 4), "ms_per_answer": round(1000 * base, 2), "speedup": 1.0,
                 "questions": n_q, "model": MODEL,
                 "note": f"mean of a run before ({1000 * sec:.1f} ms) and after ({1000 * sec2:.1f} ms) the thresholds"})
    for thr, (a, ex, s) in zip(thresholds, results):
        rows.append({"setting": "sgl" if thr <= 1 else "sgl, no exit (threshold above 1)", "threshold": thr,
                     "keep": keep, "exit_rate": round(ex, 4), "accuracy": round(a, 4),
                     "ms_per_answer": round(1000 * s, 2), "speedup": round(base / s, 3), "questions": n_q,
                     "model": MODEL, "note": ""})
        print(f"threshold {thr}: exit {ex:.3f}, accuracy {a:.3f}, {1000 * s:.1f} ms per answer ({base / s:.2f}x)")
    out = Path(args.out or "bench/results/vlm_clutter_see.csv")
    _write(rows, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["setting"] == "sgl"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r["exit_rate"] for r in pts], [r["accuracy"] for r in pts], marker="o", label="sgl early exit")
    for r in pts:
        ax.annotate(f"{r['threshold']}\n{r['speedup']}x", (r["exit_rate"], r["accuracy"]), fontsize=6)
    ax.axhline(rows[0]["accuracy"], color="gray", ls="--", lw=1, label="large model alone")
    ax.set_xlabel("share of questions answered by the small model alone")
    ax.set_ylabel("accuracy")
    ax.set_title("SGL early exit (threshold, end-to-end speed-up)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
