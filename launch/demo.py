"""The main job end to end on this CPU box, as the real commands a cluster user runs, at small sizes.

    python launch/demo.py [--quick] [--cpt-lora] [--out demo_out]

1. prepare the shared SlimPajama sample (train and validation) as token shards with the real LLaMA tokenizer;
2. make a small Llama "source" model and pretrain it briefly on the sample, so that pruning has signal
   (a stand-in for Vicuna-7B, which does not fit this box);
3. score its blocks with the PPL criterion and prune it;
4. continue pretraining the pruned model with DeepSpeed ZeRO-2 on 2 CPU ranks, checkpointing and evaluating
   inline (validation loss, WikiText-2/PTB perplexity, the seven zero-shot tasks on local data), twice from the
   same start with the same tokens: plain, and distilled from the unpruned source model (distill.teacher);
5. with --cpt-lora, the v2 paper's CPT => LoRA: export the plain CPT run's last checkpoint as a Hugging Face model,
   instruction-tune it with LoRA on conversations (BoolQ and PIQA rows the evaluation does not read), merge, and
   evaluate the merged model on the same tasks (off by default: it adds about 2 minutes to the full demo);
6. draw curves.png (both runs, the source model as a dashed reference) and print a summary table.
Every step is skipped when its output is already there (a training run that was stopped resumes from its newest
checkpoint), so a second run finishes quickly; each step prints the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from shortened.ports import free_port  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "llama-tokenizer" / "tokenizer.model"
SAMPLE = SHARED / "slimpajama-sample"
EVAL_DATA = SHARED / "eval"
RECIPE = ROOT / "configs" / "cpt" / "tiny-cpu.yaml"
ZERO_SHOT = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@dataclass(frozen=True)
class Sizes:
    layers: int  # blocks of the source model
    hidden: int
    remove: int  # blocks pruned away
    seq_len: int
    pretrain_steps: int
    cpt_steps: int
    eval_every: int  # steps between inline evaluations
    eval_limit: int  # rows per zero-shot task, windows per perplexity set, sequences of validation loss
    tasks: tuple[str, ...]
    lora_examples: int  # conversations of the CPT => LoRA step (2 epochs, batch 8)


# A fresh clone's `make demo` (venv included) must finish in 20 minutes on 2 cores: both CPT runs get the same budget.
FULL = Sizes(layers=8, hidden=128, remove=2, seq_len=128, pretrain_steps=200, cpt_steps=120, eval_every=40,
             eval_limit=50, tasks=(*ZERO_SHOT, "wikitext2", "ptb"), lora_examples=64)
QUICK = Sizes(layers=4, hidden=64, remove=1, seq_len=64, pretrain_steps=30, cpt_steps=16, eval_every=8,
              eval_limit=8, tasks=("piqa", "arc_easy", "wikitext2"), lora_examples=16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the variant `make test` runs)")
    parser.add_argument("--cpt-lora", action="store_true",
                        help="also CPT => LoRA: the CPT model instruction-tuned with LoRA, merged and evaluated")
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where every artifact goes")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    shards = {split: out / "shards" / split for split in ("train", "validation")}
    for split, path in shards.items():
        step(f"prepare the {split} split as {sizes.seq_len}-token shards",
             [sys.executable, "data_prep/slimpajama.py", "--input", SAMPLE, "--split", split, "--tokenizer", TOKENIZER,
              "--output", path, "--seq-len", sizes.seq_len, "--workers", 2, "--no-progress"])

    source = make_source_model(out, sizes, shards["train"])
    pruned = out / "pruned"
    step(f"score the source model's {sizes.layers} blocks by PPL and remove {sizes.remove}",
         [sys.executable, "launch/prune.py", "--model", source, "--criterion", "ppl", "--remove", sizes.remove,
          "--calib", SAMPLE / "validation", "--calib-samples", 10, "--calib-len", sizes.seq_len,
          "--protect-first", 1, "--protect-last", 1, "--out", pruned],
         done=pruned / "prune_report.json")

    source_eval = out / "source_eval.json"
    step("evaluate the unpruned source model (the reference row of the table)",
         [sys.executable, "launch/evaluate.py", "--model", source, "--data-dir", EVAL_DATA,
          "--tasks", ",".join(sizes.tasks), "--limit", sizes.eval_limit, "--validation-shards", shards["validation"],
          "--device", "cpu", "--output", source_eval],
         done=source_eval)

    inline_eval = ("eval.mode=inline", f"eval.every_steps={sizes.eval_every}", f"eval.data_dir={EVAL_DATA}",
                   f"eval.tasks=[{','.join(sizes.tasks)}]", f"eval.limit={sizes.eval_limit}",
                   f"data.validation_path={shards['validation']}")
    runs = {"pruned + CPT": out / "cpt", "pruned + CPT + KD": out / "cpt_kd"}
    step(f"continue pretraining the pruned model: DeepSpeed ZeRO-2, 2 CPU ranks, {sizes.cpt_steps} steps, "
         f"inline evaluation every {sizes.eval_every} steps",
         deepspeed_cmd(runs["pruned + CPT"], pruned, shards["train"], sizes, sizes.cpt_steps, *inline_eval),
         done=finished(runs["pruned + CPT"], sizes.cpt_steps))
    step("the same from the same start and tokens, distilled from the unpruned source model: loss = KL(source || "
         "student), the Minitron recipe",
         deepspeed_cmd(runs["pruned + CPT + KD"], pruned, shards["train"], sizes, sizes.cpt_steps, *inline_eval,
                       f"distill.teacher={source}"),
         done=finished(runs["pruned + CPT + KD"], sizes.cpt_steps))

    tuned = cpt_then_lora(out, runs["pruned + CPT"], sizes, shards["validation"]) if args.cpt_lora else {}

    labels = [part for label in runs for part in ("--label", label)]
    step("draw the curves", [sys.executable, "launch/plot_curves.py", *runs.values(), *labels, "--reference",
                             source_eval, "--reference-label", f"source ({sizes.layers} blocks, unpruned)",
                             "--output", out / "curves.png"])
    print_summary(out, source, pruned, runs, source_eval, sizes, tuned)
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    return 0


def make_source_model(out: Path, sizes: Sizes, train_shards: Path) -> Path:
    init, pretrain, source = out / "source_init", out / "pretrain", out / "source"
    step(f"make a random {sizes.layers}-block Llama (real 32k LLaMA vocabulary) as the source model",
         [sys.executable, "launch/tiny_model.py", "--tokenizer", TOKENIZER, "--out", init, "--layers", sizes.layers,
          "--hidden", sizes.hidden], done=init / "config.json")
    print("  (the paper prunes Vicuna-7B; a small model pretrained briefly here gives pruning real signal)")
    step(f"pretrain it briefly: {sizes.pretrain_steps} steps on the sample, DeepSpeed ZeRO-2 on 2 CPU ranks",
         deepspeed_cmd(pretrain, init, train_shards, sizes, sizes.pretrain_steps),
         done=finished(pretrain, sizes.pretrain_steps))
    last = sorted((pretrain / "checkpoints").glob("step_*/complete.json"))[-1].parent
    step("export the pretrained checkpoint as a Hugging Face model",
         [sys.executable, "launch/export_hf.py", "--checkpoint", last, "--out", source],
         done=source / "config.json")
    return source


def cpt_then_lora(out: Path, cpt_run: Path, sizes: Sizes, validation_shards: Path) -> dict[str, tuple[Path, Path]]:
    """The chain of docs/pruning.md, "CPT, then LoRA": {column label: (the merged model, its evaluation file)}."""
    exported, chats, lora, result = out / "cpt_hf", out / "chats.jsonl", out / "cpt_lora", out / "cpt_lora_eval.json"
    step("export the plain CPT run's last checkpoint as a Hugging Face model",
         [sys.executable, "launch/export_hf.py", "--checkpoint", finished(cpt_run, sizes.cpt_steps).parent,
          "--out", exported], done=exported / "config.json")
    print(f"\n==> instruction data: {sizes.lora_examples} conversations from BoolQ and PIQA validation rows after "
          f"the first {sizes.eval_limit} (the ones the evaluation reads): {short(chats)}")
    if chats.exists():
        print(f"  already done: {short(chats)}")
    else:
        write_conversations(chats, sizes.lora_examples, skip=sizes.eval_limit)
    batch = 8
    steps = 2 * -(-sizes.lora_examples // batch)
    step(f"instruction-tune it with LoRA (the v2 paper's CPT => LoRA): {steps} steps, then merge",
         [sys.executable, "launch/lora.py", "--model", exported, "--data", chats, "--out", lora, "--epochs", 2,
          "--micro-batch-size", 4, "--grad-accum", batch // 4, "--lr", "1e-3", "--warmup-steps", 1,
          "--cutoff-len", 2 * sizes.seq_len, "--device", "cpu", "--dtype", "float32"],
         done=lora / "merged" / "config.json")
    # The merge writes fp16, which CPU matmuls would emulate: evaluated in fp32, as the other models are here.
    step("evaluate the merged model on the same tasks",
         [sys.executable, "launch/evaluate.py", "--model", lora / "merged", "--data-dir", EVAL_DATA,
          "--tasks", ",".join(sizes.tasks), "--limit", sizes.eval_limit, "--validation-shards", validation_shards,
          "--device", "cpu", "--dtype", "float32", "--output", result],
         done=result)
    return {f"pruned + CPT + LoRA ({steps} steps)": (lora / "merged", result)}


def write_conversations(path: Path, count: int, skip: int) -> None:
    """Vicuna-style conversations: a BoolQ passage and question answered yes or no, a PIQA goal answered with its
    right solution; half from each, `skip` rows in, so that none is a row the evaluation scores."""
    def rows(task: str) -> list[dict]:
        lines = (EVAL_DATA / task / "validation.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines[skip:skip + (count + 1) // 2]]

    chats = [[f"{r['passage'][:300]}\nQuestion: {r['question']}?", "Yes." if r["label"] else "No."]
             for r in rows("boolq")]
    chats += [[f"How would you do this? {r['goal']}", r["sol1"] if r["label"] == 0 else r["sol2"]]
              for r in rows("piqa")]
    with path.open("w") as handle:
        for question, answer in chats[:count]:
            turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            handle.write(json.dumps({"conversations": turns}) + "\n")


def finished(run_dir: Path, steps: int) -> Path:
    """The marker of a run's final checkpoint (the trainer's layout, `checkpoints/step_NNNNNNNN/complete.json`): a
    finished run is skipped instead of starting DeepSpeed only to hear there is nothing to train."""
    return run_dir / "checkpoints" / f"step_{steps:08d}" / "complete.json"


def deepspeed_cmd(run_dir: Path, model: Path, shards: Path, sizes: Sizes, steps: int, *extra: str) -> list:
    tokens = steps * 8 * sizes.seq_len  # tiny-cpu.yaml: 8 sequences per step (micro 2 x accumulation 2 x 2 ranks)
    return ["deepspeed", "--num_gpus", 2, "--master_port", free_port(), "launch/cpt.py", "--config", RECIPE,
            f"model.init_from={model}", f"data.path={shards}", f"data.seq_len={sizes.seq_len}",
            f"train.max_tokens={tokens}", f"optim.warmup_steps={max(1, steps // 20)}",
            f"checkpoint.every_steps={max(1, steps // 3)}", "log.every_steps=10",
            f"train.precision={train_precision()}",
            f"run_dir={run_dir}", *extra]


@lru_cache(maxsize=None)
def train_precision() -> str:
    """The recipe's bf16 where this CPU has bf16 kernels; fp32 where bf16 would be emulated, several times slower."""
    from shortened.train.engine import cpu_has_bf16_kernels

    if cpu_has_bf16_kernels():
        return "bf16"
    print("  (this CPU has no bf16 kernels (no AVX-512): emulated bf16 would make every step ~5x slower, so the "
          "demo trains in fp32: train.precision=fp32)")
    return "fp32"


def step(title: str, cmd: list, done: Path | None = None) -> None:
    """Print and run one real command; skip it when its output says it already ran."""
    printable = " ".join(shlex.quote(short(c)) for c in cmd)
    print(f"\n==> {title}\n$ {printable}", flush=True)
    if done is not None and done.exists():
        print(f"  already done: {short(done)}")
        return
    # The venv's tools first, as `make` puts them: DeepSpeed builds its CPU ops with whichever ninja PATH finds, and a
    # system ninja of another version rebuilds (~80 s) what the venv's built, each time the two alternate.
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    if cmd[0] == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), *cmd[1:]]
    started = time.monotonic()
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if result.returncode:
        raise SystemExit(f"demo step failed (exit {result.returncode}): {title}")
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)


def print_summary(out: Path, source: Path, pruned: Path, runs: dict[str, Path], source_eval: Path,
                  sizes: Sizes, tuned: dict[str, tuple[Path, Path]]) -> None:
    """One row per task: the source model, the pruned model before training (step 0), each run's last point, and
    each model of `tuned` ({label: (model, its launch/evaluate.py output)})."""
    ok = {label: [r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())
                  if r["status"] == "ok" and r.get("primary", True)] for label, run in runs.items()}

    def at(rows: list[dict], step: int) -> dict[str, float]:
        return {r["task"]: r["value"] for r in rows if r["step"] == step}

    plain = next(iter(ok.values()))
    metric_of = {r["task"]: r["metric"] for r in plain}  # the metric the paper reports for each task
    report = json.loads((pruned / "prune_report.json").read_text())
    kept = sizes.layers - len(report["removed_blocks"])
    def evaluated(result: Path) -> dict[str, float | None]:
        metrics = json.loads(result.read_text())
        return {t: metrics.get(t, {}).get(m) for t, m in metric_of.items()}

    columns = {f"source ({sizes.layers} blocks)": evaluated(source_eval),
               f"pruned ({kept})": at(plain, min(r["step"] for r in plain))}
    for label, rows in ok.items():
        last = max(r["step"] for r in rows)
        columns[f"{label} ({last} steps)"] = at(rows, last)
    columns.update({label: evaluated(result) for label, (_, result) in tuned.items()})
    width = max(map(len, columns)) + 2
    print(f"\n{'task':<16}{'metric':<10}" + "".join(f"{c:>{width}}" for c in columns))
    for task in sorted(metric_of):
        values = [column.get(task) for column in columns.values()]
        print(f"{task:<16}{metric_of[task]:<10}"
              + "".join(f"{v:>{width}.4f}" if isinstance(v, float) else f"{'-':>{width}}" for v in values))
    print(f"\nremoved blocks (PPL criterion): {report['removed_blocks']}")
    print("artifacts:")
    artifacts = [("token shards", out / "shards"), ("source model", source), ("pruned model + report", pruned),
                 *((f"{label} run (train_log.jsonl, results.jsonl)", run) for label, run in runs.items()),
                 *((f"{label}: {what}", path) for label, paths in tuned.items()
                   for what, path in zip(("merged model", "its evaluation"), paths)),
                 ("curves", out / "curves.png")]
    for what, path in artifacts:
        print(f"  {what:<56} {path}")


def short(value) -> str:
    text = str(value)
    return os.path.relpath(text, ROOT) if text.startswith(str(ROOT.parent)) else text


if __name__ == "__main__":
    sys.exit(main())
