"""Dynamic batch loading (`data.dynamic`): the update rule against an independent computation, per-domain
validation losses that are the same bits on any world size, the errors that name their key, and real runs on the
shared sample packed by source: a 2-rank run stopped between two updates and resumed on 2 and on 1 rank reads the
same samples under the same weights, its logged weights follow from its logged losses by hand, and a reference
measured from a model (the distillation teacher) is kept in the run directory and read back on resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_mixture import checkpoint_with
from transformers import AutoModelForCausalLM

from shortened.config import ConfigError, RunConfig, load_config, to_dict
from shortened.data.dynamic import updated_weights
from shortened.data.mixture import MixtureState, SourceIndex, advance
from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.shards import PackedShards
from shortened.eval.results import read_results
from shortened.eval.validation import domain_validation_losses
from shortened.modeling import build_tiny_llama, save_with_tokenizer
from shortened.train import checkpoint as ckpt
from shortened.train.dynamic import REFERENCE_FILE, check_dynamic, kept_reference
from shortened.train.plan import natural_mixture, plan_mixture

from train_support import RECIPE, SEQ, overrides, python, read_log, run_ok, warm

# ---------------------------------------------------------------------------------------------- the rule


def by_hand(weights: dict[str, float], losses: dict[str, float], reference: dict[str, float], eta: float,
            smoothing: float) -> dict[str, float]:
    """The paper's update written out with numpy, over the sampled (positive-weight) domains."""
    names = [s for s, w in weights.items() if w > 0]
    lag = np.array([max(losses[s] - reference[s], 0.0) for s in names])
    alpha = np.array([weights[s] for s in names]) * np.exp(eta * lag)
    alpha /= alpha.sum()
    new = (1 - smoothing) * alpha + smoothing / len(names)
    return {s: float(new[names.index(s)]) if s in names else 0.0 for s in weights}


def test_the_update_is_the_papers_rule_and_leaves_an_unsampled_domain_at_zero():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.0}
    losses, reference = {"a": 2.0, "b": 3.5, "c": 1.0}, {"a": 2.5, "b": 2.0, "c": 0.25}
    new = updated_weights(weights, losses, reference, eta=1.0, smoothing=1e-4)
    assert new == pytest.approx(by_hand(weights, losses, reference, 1.0, 1e-4), rel=1e-12)
    assert list(new) == list(weights) and new["d"] == 0.0 and math.isclose(sum(new.values()), 1.0)
    assert new["b"] > weights["b"] and new["a"] < weights["a"]  # b lags most; a is ahead of its reference (clipped)
    ahead = updated_weights(weights, {"a": 0, "b": 0, "c": 0}, reference, eta=1.0, smoothing=0.0)
    assert ahead == pytest.approx(weights, rel=1e-12)  # no domain lags: nothing moves but the smoothing
    huge = updated_weights(weights, {"a": 2000.0, "b": 0.0, "c": 0.0}, reference, eta=1.0, smoothing=1e-4)
    assert huge["a"] == pytest.approx(1 - 1e-4 + 1e-4 / 3) and all(map(math.isfinite, huge.values()))


# ---------------------------------------------------------------------------------------------- the measurement

TRAIN_WEIGHTS = {"RedPajamaCommonCrawl": 0.6, "RedPajamaArXiv": 0.3, "RedPajamaGithub": 0.1}
SAMPLED = sorted(TRAIN_WEIGHTS)


@pytest.fixture(scope="module")
def by_source(tmp_path_factory, slimpajama_sample, tokenizer_model) -> dict[str, Path]:
    """The shared sample's train and validation splits as 64-token shards packed by source."""
    out = tmp_path_factory.mktemp("by_source")
    for split in ("train", "validation"):
        prepare_shards(PrepareConfig(input=str(slimpajama_sample), split=split, tokenizer=str(tokenizer_model),
                                     output=str(out / split), seq_len=SEQ, workers=2, pack_by_source=True,
                                     progress=False, verbose=False))
    return {"train": out / "train", "validation": out / "validation"}


def test_domain_losses_are_each_domains_mean_token_loss_and_the_same_bits_on_1_and_2_ranks(by_source):
    shards = PackedShards(by_source["validation"])
    index = SourceIndex.from_manifest(shards.manifest)
    model = build_tiny_llama(seed=3, num_layers=2).eval()
    one = domain_validation_losses(model, shards, index, SAMPLED, batch_size=3, limit=7)
    rank1_sums: list[float] = []

    def keep(sums: list[float]) -> list[float]:
        rank1_sums.extend(sums)
        return sums

    domain_validation_losses(model, shards, index, SAMPLED, batch_size=3, limit=7, rank=1, world_size=2, reduce=keep)
    assert 0 < sum(s != 0 for s in rank1_sums) < len(rank1_sums)  # rank 1 scored some of the batches, not all
    two = domain_validation_losses(model, shards, index, SAMPLED, batch_size=3, limit=7, rank=0, world_size=2,
                                   reduce=lambda sums: [a + b for a, b in zip(sums, rank1_sums)])
    assert two == one  # bit for bit
    for source in SAMPLED:  # independently: transformers' own mean loss over each of the 7 sequences
        size = index.size(source)
        assert size > 7  # so that 7 of them are spread, not all
        ids = index.to_global(source, np.arange(7) * size // 7)
        with torch.no_grad():
            per_sequence = [model(input_ids=torch.as_tensor(shards[int(i)][None], dtype=torch.long),
                                  labels=torch.as_tensor(shards[int(i)][None], dtype=torch.long)).loss.item()
                            for i in ids]
        assert one[source] == pytest.approx(float(np.mean(per_sequence)), rel=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def dynamic_config(*extra: str) -> RunConfig:
    return load_config(RunConfig, RECIPE, ["data.validation_path=val", "data.dynamic.every_steps=4",
                                           "data.dynamic.reference={a: 1.0}", *extra])


@pytest.mark.parametrize("override, said", [
    ("data.validation_path=", "data.dynamic.every_steps: dynamic loading measures each domain's validation loss: "
                              "set data.validation_path"),
    ("data.format=stream", "data.dynamic.every_steps: needs data.format=shards"),
    ("data.dynamic.reference=null", "data.dynamic.reference: dynamic loading needs each domain's reference loss"),
    ("data.dynamic.reference=modle", "data.dynamic.reference: 'modle' is not one of 'model'"),
    ("data.dynamic.reference=model", "data.dynamic.reference_model: reference=model needs the model to measure"),
    ("data.dynamic.eta=-1", "data.dynamic.eta: -1.0 must be >= 0"),
    ("data.dynamic.smoothing=1", "data.dynamic.smoothing: 1.0 must be in"),
    ("data.dynamic.every_steps=-2", "data.dynamic.every_steps: must be >= 0"),
])
def test_a_bad_dynamic_setting_is_an_error_naming_the_key(override, said):
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
        dynamic_config(override)


def test_dynamic_loading_without_per_source_validation_shards_names_the_key_and_the_fix(by_source, tmp_path,
                                                                                         slimpajama_sample,
                                                                                         tokenizer_model):
    mixed = tmp_path / "mixed"
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="validation", tokenizer=str(tokenizer_model),
                                 output=str(mixed), seq_len=SEQ, workers=1, progress=False, verbose=False))
    config = dynamic_config(f"data.validation_path={mixed}")
    with pytest.raises(ConfigError, match=r"data.dynamic.every_steps: the validation shards in data.validation_path="
                                          r".* are not packed by source.*--pack-by-source"):
        check_dynamic(config, SAMPLED)
    config = dynamic_config(f"data.validation_path={by_source['validation']}")
    with pytest.raises(ConfigError, match="data.validation_path: the validation shards in .* have no sequence of "
                                          "RedPajamaBook, which the mixture samples; they have RedPajamaArXiv, "):
        check_dynamic(config, ["RedPajamaBook", *SAMPLED])
    with pytest.raises(ConfigError, match="data.dynamic.reference: no reference loss for RedPajamaArXiv, "
                                          "RedPajamaCommonCrawl"):
        check_dynamic(config, SAMPLED)


def test_dynamic_loading_starts_from_the_natural_mixture_and_a_resume_keeps_the_updated_weights(tmp_path):
    sizes = {"RedPajamaArXiv": 10, "RedPajamaC4": 30}
    config = dynamic_config()
    assert natural_mixture(sizes) == {"RedPajamaArXiv": 0.25, "RedPajamaC4": 0.75}
    assert plan_mixture(config, sizes, None) == MixtureState.start(natural_mixture(sizes), sorted(sizes))
    _, saved = advance(MixtureState.start({"RedPajamaArXiv": 0.9, "RedPajamaC4": 0.1}, sorted(sizes)), 8)
    written = checkpoint_with(tmp_path, saved)
    same = dynamic_config("data.mixture={RedPajamaC4: 1}")
    (written.path / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(to_dict(same)))
    assert plan_mixture(same, sizes, written) == saved  # data.mixture gave the start; the checkpoint holds the updates
    changed = plan_mixture(dynamic_config("data.mixture={RedPajamaArXiv: 1}"), sizes, written)
    assert changed == saved.with_weights({"RedPajamaArXiv": 1.0}, sorted(sizes))  # a new setting: a new start
    with pytest.raises(ConfigError, match="data.dynamic.every_steps: the shards in .* are not packed by source"):
        plan_mixture(config, None, None)


# ---------------------------------------------------------------------------------------------- real runs

STEPS, BATCH, EVERY, STOP = 12, 8, 4, 6  # updates after steps 4, 8 and 12; stopped at 6, between two
REFERENCE = {"RedPajamaCommonCrawl": 8.0, "RedPajamaArXiv": 10.0, "RedPajamaGithub": 11.0}  # CommonCrawl lags most
SETTINGS = dict(eta=1.0, smoothing=1e-4)


def dynamic_run(run_dir: Path, shards: dict[str, Path], model: Path, *extra: str) -> list[str]:
    mixture = "{" + ", ".join(f"{s}: {w}" for s, w in TRAIN_WEIGHTS.items()) + "}"
    reference = "{" + ", ".join(f"{s}: {w}" for s, w in REFERENCE.items()) + "}"
    return overrides(run_dir, shards["train"], model, f"data.validation_path={shards['validation']}",
                     f"data.mixture={mixture}", f"data.dynamic.every_steps={EVERY}",
                     f"data.dynamic.reference={reference}", "data.dynamic.eval_sequences=6",
                     f"train.global_batch_size={BATCH}", "train.micro_batch_size=2",
                     f"train.max_tokens={STEPS * BATCH * SEQ}", f"checkpoint.every_steps={STOP}", *extra)


@pytest.fixture(scope="module")
def dynamic_runs(tmp_path_factory, by_source, tiny_init_model) -> dict[str, Path]:
    """12 steps on 2 ranks; its step-6 checkpoint continued on 2 ranks and on 1, each in its own run dir."""
    work = tmp_path_factory.mktemp("dynamic_runs")
    runs = {name: work / name for name in ("full", "two_ranks", "one_rank")}
    run_ok(warm(2, dynamic_run(runs["full"], by_source, tiny_init_model), work / "full.out"))
    step6 = ckpt.checkpoints_root(runs["full"]) / ckpt.tag_for(STOP)
    resume = dynamic_run(runs["two_ranks"], by_source, tiny_init_model, f"resume={step6}")
    run_ok(warm(2, resume, work / "two_ranks.out"))
    run_ok(python(dynamic_run(runs["one_rank"], by_source, tiny_init_model, f"resume={step6}"),
                  work / "one_rank.out"))
    return runs


def test_the_logged_weights_follow_from_the_logged_losses_by_the_update_rule(dynamic_runs):
    log = {r["step"]: r for r in read_log(dynamic_runs["full"])}
    assert sorted(log) == list(range(1, STEPS + 1))
    updates = [step for step, r in log.items() if "dynamic_losses" in r]
    assert updates == [4, 8, 12]
    start = {s: TRAIN_WEIGHTS.get(s, 0.0) for s in log[1]["domain_weights"]}
    assert log[1]["domain_weights"] == pytest.approx(start, abs=1e-15)
    for step in range(1, STEPS):  # between updates the weights hold; after one they are the rule's
        before, after = log[step]["domain_weights"], log[step + 1]["domain_weights"]
        if step in updates:
            expected = by_hand(before, log[step]["dynamic_losses"], REFERENCE, **SETTINGS)
            assert after == pytest.approx(expected, rel=1e-12), step
            assert after != before
        else:
            assert after == before
    assert log[5]["domain_weights"]["RedPajamaCommonCrawl"] > TRAIN_WEIGHTS["RedPajamaCommonCrawl"]
    for record in log.values():  # each step's batch is split by that step's weights
        assert sum(record["domain_samples"].values()) == BATCH
        assert all(record["domain_samples"][s] == 0 for s, w in record["domain_weights"].items() if w == 0)
    rows = [r for r in read_results(dynamic_runs["full"] / "results.jsonl") if r["source"] == "dynamic"]
    assert {(r["step"], r["task"]): r["value"] for r in rows} == {
        (step, f"validation/{s}"): loss for step in updates for s, loss in log[step]["dynamic_losses"].items()}
    assert {r["samples"] for r in rows} == {6} and {r["sequences"] for r in rows} == {"spread"}


@pytest.mark.parametrize("resumed", ["two_ranks", "one_rank"])
def test_stopped_between_two_updates_and_resumed_it_reads_the_same_samples_under_the_same_weights(dynamic_runs,
                                                                                                  resumed):
    reference = {r["step"]: r for r in read_log(dynamic_runs["full"])}
    log = read_log(dynamic_runs[resumed])
    assert [r["step"] for r in log] == list(range(STOP + 1, STEPS + 1))
    for record in log:
        expected = reference[record["step"]]
        assert record["sample_ids"] == expected["sample_ids"] and record["domain_samples"] == expected[
            "domain_samples"], record["step"]
        if resumed == "two_ranks":  # the same ranks: the same bits
            assert (record["loss"], record["domain_weights"]) == (expected["loss"], expected["domain_weights"])
            assert record.get("dynamic_losses") == expected.get("dynamic_losses")
        else:  # ZeRO re-partitioned: the reductions add in another order
            assert record["loss"] == pytest.approx(expected["loss"], rel=1e-4)
            assert record["domain_weights"] == pytest.approx(expected["domain_weights"], rel=1e-4)


def test_a_mixture_changed_on_resume_is_the_updates_new_start(dynamic_runs, by_source, tiny_init_model, tmp_path):
    """A new source at 0.3 on resume used to get no sample: the checkpoint's updated weights were kept, while the
    log said the change was honoured and config.yaml recorded it."""
    step6 = ckpt.checkpoints_root(dynamic_runs["full"]) / ckpt.tag_for(STOP)
    mixture = {"RedPajamaCommonCrawl": 0.4, "RedPajamaArXiv": 0.2, "RedPajamaGithub": 0.1, "RedPajamaC4": 0.3}
    reference = {**REFERENCE, "RedPajamaC4": 9.0}
    args = [*dynamic_run(tmp_path / "run", by_source, tiny_init_model, f"resume={step6}", "train.max_steps=8"),
            "data.mixture={" + ", ".join(f"{s}: {w}" for s, w in mixture.items()) + "}",
            "data.dynamic.reference={" + ", ".join(f"{s}: {w}" for s, w in reference.items()) + "}"]
    output = run_ok(python(args, tmp_path / "run.out"))
    assert f"data.mixture changes on resume at step {STOP}" in output
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [STOP + 1, STOP + 2]
    assert log[0]["domain_weights"] == pytest.approx({s: mixture.get(s, 0.0) for s in log[0]["domain_weights"]},
                                                     abs=1e-15)
    assert all(r["domain_samples"]["RedPajamaC4"] > 0 for r in log)
    assert log[1]["dynamic_losses"].keys() == reference.keys()  # the update goes on from the new weights


@pytest.mark.parametrize("model, said", [
    (dict(vocab_size=32064), "has vocab_size=32064, the student model.init_from="),
    (dict(max_position_embeddings=32), "data.seq_len=64 exceeds data.dynamic.reference_model="),
    (None, "has no tokenizer.model / tokenizer.json to compare with the student's"),
])
def test_a_reference_model_that_scores_other_tokens_is_refused_naming_the_key(model, said, by_source,
                                                                              tiny_init_model, tokenizer_model,
                                                                              tmp_path):
    """The reference used to be loaded unchecked: its losses over other ids drove the weights. It now gets the
    distillation teacher's check."""
    reference = tmp_path / "reference"
    if model is None:
        build_tiny_llama(seed=1, num_layers=2).save_pretrained(reference)
    else:
        save_with_tokenizer(build_tiny_llama(seed=1, num_layers=2, **model), reference, tokenizer_model)
    args = dynamic_run(tmp_path / "run", by_source, tiny_init_model, "data.dynamic.reference=model",
                       f"data.dynamic.reference_model={reference}", "train.max_steps=2")
    job = python(args, tmp_path / "run.out")
    assert job.wait() == 2
    errors = [line for line in job.output().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"data.dynamic.reference_model={reference}" in errors[0] and said in errors[0], \
        job.output()[-3000:]
    assert not (tmp_path / "run" / REFERENCE_FILE).exists()


def test_a_reference_model_is_measured_once_kept_in_the_run_dir_and_read_back_on_resume(tmp_path, by_source,
                                                                                        tiny_init_model):
    """reference=model with distillation on and no reference_model: the teacher's losses are the reference."""
    run_dir = tmp_path / "run"
    args = dynamic_run(run_dir, by_source, tiny_init_model, "data.dynamic.reference=model",
                       f"distill.teacher={tiny_init_model}", "train.max_steps=6")
    first = run_ok(python(args, tmp_path / "first.out"))
    kept = json.loads((run_dir / REFERENCE_FILE).read_text())
    assert kept["model"] == str(tiny_init_model.resolve()) and kept["eval_sequences"] == 6
    shards = PackedShards(by_source["validation"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_init_model).eval()
    expected = domain_validation_losses(teacher, shards, SourceIndex.from_manifest(shards.manifest), SAMPLED,
                                        batch_size=2, limit=6)
    assert kept["losses"] == pytest.approx(expected, rel=1e-6)
    assert f"data.dynamic: reference losses of {tiny_init_model} on" in first
    again = run_ok(python([*args[:-1], "train.max_steps=12"], tmp_path / "again.out"))
    assert f"data.dynamic: reference losses of {tiny_init_model} from {run_dir / REFERENCE_FILE}" in again
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["step"] for r in log if "dynamic_losses" in r] == [4, 8, 12]
    assert all(r["kd_loss"] is not None for r in log)  # distilled throughout


def test_kept_reference_losses_are_used_only_if_measured_on_the_same_sequences(tmp_path, caplog):
    """A reference file written before the validation sequences were spread (no "sequences" key) holds the losses of
    each domain's first ones: comparing them with the spread ones' would bias every update, so they are measured
    again, and the log says on what each was measured."""
    measured_on = {"model": "/m", "validation_path": "/v", "eval_sequences": 6, "sequences": "spread"}
    path = tmp_path / REFERENCE_FILE
    assert kept_reference(path, measured_on, ["A"]) is None  # no file: measured, nothing said
    path.write_text(json.dumps({**measured_on, "losses": {"A": 2.5, "B": 3.0}}))
    assert kept_reference(path, measured_on, ["A"]) == {"A": 2.5}
    with caplog.at_level("INFO", logger="shortened.train.dynamic"):
        assert kept_reference(path, measured_on, ["A", "C"]) is None  # a domain it has no loss of
    assert "without C" in caplog.text and "unreadable" not in caplog.text
    older = {key: value for key, value in measured_on.items() if key != "sequences"}
    path.write_text(json.dumps({**older, "losses": {"A": 2.5}}))
    with caplog.at_level("INFO", logger="shortened.train.dynamic"):
        assert kept_reference(path, measured_on, ["A"]) is None
    assert "'sequences': None" in caplog.text and "measuring the reference losses again" in caplog.text
    path.write_text("[1, 2]")
    assert kept_reference(path, measured_on, ["A"]) is None
    assert "unreadable" in caplog.text


def test_curves_show_the_domain_weights_over_tokens_and_each_domains_validation_loss(dynamic_runs):
    import matplotlib.pyplot as plt

    from shortened.eval.curves import curves_figure

    fig = curves_figure([dynamic_runs["full"]], labels=["dynamic"])
    try:
        axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        log = read_log(dynamic_runs["full"])
        lines = {line.get_label(): line for line in axes["domain weights: dynamic"].get_lines()}
        assert set(lines) == set(log[0]["domain_weights"])
        for source, line in lines.items():
            assert list(line.get_xdata()) == [r["tokens"] for r in log]
            assert list(line.get_ydata()) == [r["domain_weights"][source] for r in log]
        for source in SAMPLED:
            (line,) = axes[f"validation/{source} (loss)"].get_lines()
            assert list(line.get_ydata()) == [r["dynamic_losses"][source] for r in log if "dynamic_losses" in r]
    finally:
        plt.close(fig)
