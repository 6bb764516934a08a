"""Evaluation sharded over 2 real gloo ranks (forked warm, tests/warm_start.py): the single-process numbers; a
rank-local failure stalls nothing."""
from __future__ import annotations

import json

import yaml

from shortened.config import EvalConfig
from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.eval.suite import EvalSuite
from shortened.modeling import build_tiny_llama

from conftest import EVAL_DATA, ROOT, TOKENIZER_MODEL, free_port, subprocess_env
from warm_start import WarmGroup, WarmProcess

TIMEOUT_S = 10


def _mirror_with_rank_local_fault(tmp_path):
    """arc_easy twice: as shipped, and with row 1 (rank 1's first document) naming an answer it does not offer."""
    mirror = tmp_path / "mirror"
    for rel in ("boolq/validation.jsonl", "arc_easy/test.jsonl", "wikitext2/test.jsonl"):
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        (mirror / rel).write_bytes((EVAL_DATA / rel).read_bytes())
    rows = [json.loads(line) for line in (EVAL_DATA / "arc_easy/test.jsonl").read_text().splitlines()]
    rows[1]["answerKey"] = "Z"
    (mirror / "arc_bad").mkdir()
    (mirror / "arc_bad/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = yaml.safe_load((ROOT / "shortened/eval/tasks.yaml").read_text())
    tasks = {name: table["tasks"][name] for name in ("boolq", "arc_easy", "wikitext2")}
    tasks["arc_easy"]["splits"] = {"test": "arc_easy/test.jsonl"}
    # No row schema: the bad row is not left out but reaches lm-eval, which fails on the rank that holds it.
    tasks["arc_bad"] = {key: value for key, value in tasks["arc_easy"].items() if key != "rows"}
    tasks["arc_bad"]["splits"] = {"test": "arc_bad/test.jsonl"}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"tasks": tasks}))
    return dict(tasks=["boolq", "arc_bad", "arc_easy", "wikitext2"], data_dir=str(mirror), limit=8, batch_size=4,
                task_file=str(tmp_path / "tasks.yaml"), collective_timeout_s=TIMEOUT_S)


def test_two_ranks_match_one_and_survive_a_rank_local_failure(tmp_path, slimpajama_sample):
    settings = _mirror_with_rank_local_fault(tmp_path)
    shards = tmp_path / "val_shards"
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="validation", tokenizer=str(TOKENIZER_MODEL),
                                 output=str(shards), seq_len=128, progress=False, verbose=False))
    port = str(free_port())
    argv = [ROOT / "tests" / "eval_support.py", tmp_path, json.dumps(settings), shards]
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    ranks = WarmGroup([WarmProcess(argv, subprocess_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                        MASTER_PORT=port), ROOT / "tests", logs[r])
                       for r in range(2)])
    try:
        code = ranks.wait(timeout=240)
    finally:
        ranks.kill()
    assert code == 0, logs[1].read_text()[-3000:] + logs[0].read_text()[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ranks[0]) == strip(ranks[1])  # every rank returns the same rows

    sharded = {(r["task"], r["metric"]): r for r in ranks[0]}
    bad = sharded[("arc_bad", "acc")]
    assert bad["status"] == "failed" and bad["error"].startswith("rank 1: Traceback") and "ValueError" in bad["error"]
    assert "rank 0 gave up waiting for the other ranks" in bad["error"]
    # rank 0 gave up after the collective timeout, not before, and not much later
    assert TIMEOUT_S * 0.9 <= bad["seconds"] < 4 * TIMEOUT_S

    single = EvalSuite(EvalConfig(**settings), TOKENIZER_MODEL, validation_path=shards).run(
        build_tiny_llama(seed=11, num_layers=2))
    single = {(r["task"], r["metric"]): r for r in single}
    assert single[("arc_bad", "acc")]["status"] == "failed"
    for key in [("boolq", "acc"), ("arc_easy", "acc"), ("arc_easy", "acc_norm")]:
        assert sharded[key]["status"] == "ok" and sharded[key]["samples"] == 8
        assert sharded[key]["value"] == single[key]["value"], key
        assert abs(sharded[key]["stderr"] - single[key]["stderr"]) < 1e-12, key
    for key in [("wikitext2", "ppl"), ("validation", "loss")]:
        got, ref = sharded[key], single[key]
        assert got["status"] == "ok" and got["samples"] == ref["samples"] == 8 * 127, key
        # float32 logits of differently composed batches (4 windows per rank vs 8 on one) agree to ~1e-7
        assert abs(got["value"] - ref["value"]) / ref["value"] < 1e-5, key
