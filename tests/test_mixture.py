"""Static mixture weights (`data.mixture`): the per-step split stays within one sample of weight x samples, each
source is read in its own shuffled order without repeats within its epoch, the global batch is the same on any
world size, the state round-trips, bad mixtures are errors naming the key; and a real 2-rank run on the shared sample
packed by source, stopped at step 20 and resumed on 1 rank, reads the same samples per source."""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from test_train_state import sample_state

from shortened.config import ConfigError, RunConfig, load_config, render_config, value_sources
from shortened.data.mixture import (
    MixtureError,
    MixtureSampler,
    MixtureState,
    SourceIndex,
    advance,
    domain_samples,
    epochs_begun,
    global_batch,
    source_seed,
)
from shortened.data.prepare import PrepareConfig, prepare_shards
from shortened.data.sampler import global_order_indices
from shortened.data.shards import read_manifest
from shortened.train import checkpoint as ckpt
from shortened.train.loop import LoopState, _domain_step
from shortened.train.plan import plan_mixture
from shortened.train.state import CheckpointError, TrainingState

from train_support import RECIPE, SEQ, overrides, python, read_log, run_ok, warm

# ---------------------------------------------------------------------------------------------- the rounding


def run_steps(weights: dict[str, float], batch: int, steps: int):
    """Each step's counts and the state after it, from a fresh state."""
    state = MixtureState.start(weights, sorted(weights))
    for _ in range(steps):
        counts, state = advance(state, batch)
        yield counts, state


def third_seventh_rest() -> dict[str, float]:
    return {"a": 1 / 3, "b": 1 / 7, "c": 1 - 1 / 3 - 1 / 7}


def random_weights(n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    raw = [rng.random() ** 3 for _ in range(n)]  # skewed: some sources far under one sample per step
    return {f"s{i}": w / sum(raw) for i, w in enumerate(raw)}


@pytest.mark.parametrize("weights, batch, steps", [
    (third_seventh_rest(), 8, 3000),
    (third_seventh_rest(), 1, 3000),
    ({"a": 6 / 14, "b": 6 / 14, "c": 2 / 14}, 1, 200),  # the per-step largest remainder gives c -1 at steps 4, 11
    ({"big": 0.97, "tiny": 0.03}, 8, 2000),  # under one sample per step
    (random_weights(7, seed=1), 5, 2000),
    (random_weights(7, seed=2), 512, 60),
])
def test_cumulative_counts_stay_within_one_sample_of_weight_times_samples(weights, batch, steps):
    total = {source: 0 for source in weights}
    for step, (counts, state) in enumerate(run_steps(weights, batch, steps), start=1):
        assert sum(counts.values()) == batch and min(counts.values()) >= 0
        for source, count in counts.items():
            total[source] += count
            assert abs(total[source] - state.weights[source] * batch * step) < 1 + 1e-9, (step, source, total)
        assert state.consumed == total


def test_exact_weights_give_exact_counts_and_a_zero_weight_is_never_sampled():
    counts = [c for c, _ in run_steps({"a": 0.5, "b": 0.25, "c": 0.25, "d": 0.0}, 8, 50)]
    assert all(c == {"a": 4, "b": 2, "c": 2, "d": 0} for c in counts)
    thirds = [c["a"] for c, _ in run_steps({"a": 1 / 3, "b": 2 / 3}, 1, 30)]
    assert all(sum(thirds[k : k + 3]) == 1 for k in range(0, 30, 3))  # spread out, not bunched


def test_the_split_is_a_function_of_the_state_so_a_resumed_state_continues_it():
    states = [s for _, s in run_steps(third_seventh_rest(), 8, 40)]
    reloaded = MixtureState.from_dict(json.loads(json.dumps(states[19].to_dict())))
    assert reloaded == states[19]
    state = reloaded
    for expected in states[20:]:
        _, state = advance(state, 8)
        assert state == expected


def test_the_state_round_trips_through_json_and_a_bad_one_is_refused():
    _, state = advance(MixtureState.start({"x": 0.7, "y": 0.3}, ["x", "y", "z"]), 8)
    assert state.weights == {"x": 0.7, "y": 0.3, "z": 0.0} and sum(state.consumed.values()) == 8
    assert MixtureState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    for bad, said in [({"weights": {}}, "has the keys"),
                      ({**state.to_dict(), "consumed": {"x": 1}}, "name different sources"),
                      ({**state.to_dict(), "consumed": {"x": -1, "y": 0, "z": 0}}, "integers >= 0"),
                      ({**state.to_dict(), "remainders": {"x": "0", "y": 0, "z": 0}}, "finite numbers")]:
        with pytest.raises(MixtureError, match=said):
            MixtureState.from_dict(bad)
    training = dataclasses.replace(sample_state(), mixture=state)
    assert TrainingState.from_json(training.to_json(), "f") == training
    assert json.loads(training.to_json())["mixture"]["consumed"] == state.consumed


def test_new_weights_keep_each_sources_count_and_restart_the_rounding():
    _, state = advance(MixtureState.start({"x": 0.7, "y": 0.3}, ["x", "y"]), 7)
    moved = state.with_weights({"x": 0.2, "w": 0.8}, ["w", "x", "y"])
    assert moved.weights == {"w": 0.8, "x": 0.2, "y": 0.0}
    assert moved.consumed == {"w": 0, **state.consumed} and set(moved.remainders.values()) == {0.0}


# ---------------------------------------------------------------------------------------------- the orders


def toy_index() -> SourceIndex:
    """Shards a(5) b(7) a(3) c(2): global ids a = 0-4, 12-14; b = 5-11; c = 15-16."""
    return SourceIndex(["a", "b", "a", "c"], [5, 7, 3, 2])


def test_the_source_index_maps_each_sources_local_index_to_its_global_samples():
    index = toy_index()
    assert index.sizes() == {"a": 8, "b": 7, "c": 2} and index.num_samples == 17
    assert index.to_global("a", np.arange(8)).tolist() == [0, 1, 2, 3, 4, 12, 13, 14]
    assert index.to_global("c", np.arange(2)).tolist() == [15, 16]
    assert index.count_by_source(np.array([0, 5, 11, 12, 16])) == {"a": 2, "b": 2, "c": 1}
    manifest = {"pack_by_source": True, "shards": [{"source": s, "num_sequences": n}
                                                   for s, n in zip("abac", (5, 7, 3, 2))]}
    assert SourceIndex.from_manifest(manifest).sizes() == index.sizes()
    assert SourceIndex.from_manifest({"shards": manifest["shards"]}) is None


def test_a_source_never_repeats_within_its_epoch_and_starts_its_next_when_it_runs_out():
    index = toy_index()
    order = domain_samples(index, 1234, "a", 0, 8 * 3)
    epochs = [order[e * 8 : (e + 1) * 8].tolist() for e in range(3)]
    assert all(sorted(epoch) == [0, 1, 2, 3, 4, 12, 13, 14] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # a fresh shuffle each epoch
    assert domain_samples(index, 1234, "a", 5, 9).tolist() == order[5:14].tolist()  # any start: the same order
    assert domain_samples(index, 99, "a", 0, 8).tolist() != epochs[0]  # data.seed moves it
    assert source_seed(1234, "a") != source_seed(1234, "b") and source_seed(1234, "a") == source_seed(1234, "a")
    before = MixtureState.start({"a": 1.0}, ["a", "b", "c"])
    _, after = advance(before, 7)
    assert epochs_begun(index, before, after) == {}
    _, later = advance(after, 2)  # positions 7, 8: the last of epoch 0 and the first of epoch 1
    assert epochs_begun(index, after, later) == {"a": 1}


def per_step_global_batches(index: SourceIndex, state: MixtureState, batch: int, micro: int, world: int,
                            steps: int) -> list[list[int]]:
    """What `world` ranks read at each step, rank slices joined in rank order."""
    per_rank = batch // world // micro
    streams = [iter(MixtureSampler(index, state, batch, micro, rank, world, seed=7)) for rank in range(world)]
    return [[i for stream in streams for _ in range(per_rank) for i in next(stream)] for _ in range(steps)]


def test_the_global_batch_is_the_same_on_1_2_and_4_ranks_and_is_each_sources_next_samples_in_name_order():
    index = toy_index()
    start = MixtureState.start({"a": 0.5, "b": 1 / 3, "c": 1 / 6}, ["a", "b", "c"])
    one = per_step_global_batches(index, start, 8, 1, 1, 12)
    assert per_step_global_batches(index, start, 8, 2, 2, 12) == one
    assert per_step_global_batches(index, start, 8, 1, 4, 12) == one
    state = start
    for batch in one:
        counts, after = advance(state, 8)
        assert batch == global_batch(index, 7, state, counts).tolist()
        sources = [s for s, n in counts.items() for _ in range(n)]
        assert index.count_by_source(np.array(batch)) == counts and sources == sorted(sources)
        state = after
    resumed = per_step_global_batches(index, MixtureState.from_dict(json.loads(json.dumps(state.to_dict()))),
                                      8, 2, 2, 3)
    assert resumed == per_step_global_batches(index, start, 8, 1, 1, 15)[12:]


class Messages:
    """Stands in for rank 0's TrainLogger: keeps what the loop says."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)


def test_the_loop_advances_its_own_copy_of_the_state_and_logs_each_steps_sources():
    index = toy_index()
    config = mixture_config("train.global_batch_size=4", "train.micro_batch_size=1", "data.mixture={a: 1, c: 1}")
    state = LoopState(step=0, consumed_samples=0, last_checkpoint=None,
                      mixture=MixtureState.start(config.data.mixture, index.sources))
    logger, expected = Messages(), [s for _, s in run_steps({"a": 0.5, "b": 0.0, "c": 0.5}, 4, 3)]
    for step in range(3):
        fields = _domain_step(state, index, config, logger)  # type: ignore[arg-type]
        assert fields == {"domain_samples": {"a": 2, "b": 0, "c": 2}, "domain_weights": {"a": 0.5, "b": 0, "c": 0.5}}
        assert state.mixture == expected[step]
        state.step += 1
    assert logger.said == ["data.mixture: c has been read through; its epoch 1 begins at step 2",
                           "data.mixture: c has been read through; its epoch 2 begins at step 3"]
    plain = dataclasses.replace(config, data=dataclasses.replace(config.data, mixture=None))
    unmixed = LoopState(step=2, consumed_samples=8, last_checkpoint=None)
    counts = _domain_step(unmixed, index, plain, logger)["domain_samples"]  # type: ignore[arg-type]
    assert counts == index.count_by_source(global_order_indices(17, plain.data.seed, 8, 4))
    assert sum(counts.values()) == 4
    assert _domain_step(unmixed, None, plain, logger) == {} and _domain_step(unmixed, index, plain, None) == {}


# ---------------------------------------------------------------------------------------------- config errors


def mixture_config(*extra: str) -> RunConfig:
    return load_config(RunConfig, RECIPE, list(extra))


def test_the_mixture_is_given_on_the_command_line_as_a_yaml_mapping_or_per_source_and_normalised():
    config = mixture_config("data.mixture={RedPajamaC4: 1, RedPajamaArXiv: 3}")
    assert config.data.mixture == {"RedPajamaArXiv": 0.75, "RedPajamaC4": 0.25}
    assert mixture_config("data.mixture.RedPajamaC4=2").data.mixture == {"RedPajamaC4": 1.0}
    assert mixture_config().data.mixture is None
    overrides_ = ["data.mixture={b: 1, a: 1}"]
    text = render_config(mixture_config(*overrides_), value_sources(RunConfig, RECIPE, overrides_))
    line = next(line for line in text.splitlines() if line.strip().startswith("mixture:"))
    assert "{a: 0.5, b: 0.5}" in line and line.endswith("# override")


@pytest.mark.parametrize("override, said", [
    ("data.mixture={RedPajamaC4: 1, RedPajamaArXiv: -0.5}", "data.mixture.RedPajamaArXiv: weight -0.5 must be"),
    ("data.mixture={RedPajamaC4: 0, RedPajamaArXiv: 0}", "data.mixture: every weight is 0"),
    ("data.mixture={}", "data.mixture: every weight is 0"),
    ("data.mixture={RedPajamaC4: lots}", "data.mixture.RedPajamaC4: expected a number"),
    ("data.mixture=[RedPajamaC4]", "data.mixture: expected a mapping"),
])
def test_a_bad_mixture_is_an_error_naming_the_key(override, said):
    with pytest.raises(ConfigError, match=said):
        mixture_config(override)


def test_a_mixture_on_a_stream_is_an_error():
    with pytest.raises(ConfigError, match="data.mixture: needs data.format=shards"):
        mixture_config("data.format=stream", "data.mixture={RedPajamaC4: 1}")


SIZES = {"RedPajamaArXiv": 10, "RedPajamaC4": 20, "RedPajamaGithub": 30}


def test_at_plan_time_an_unknown_source_lists_the_shards_sources_and_unmixed_shards_say_how_to_prepare(caplog):
    with pytest.raises(ConfigError, match="data.mixture.RedPajamaBook: the shards in .* have no source "
                                          "'RedPajamaBook'; they have RedPajamaArXiv, RedPajamaC4, RedPajamaGithub"):
        plan_mixture(mixture_config("data.mixture={RedPajamaBook: 1}"), SIZES, None)
    with pytest.raises(ConfigError, match="data.mixture: the shards in .* are not packed by source.*--pack-by-source"):
        plan_mixture(mixture_config("data.mixture={RedPajamaC4: 1}"), None, None)
    assert plan_mixture(mixture_config(), None, None) is None
    with caplog.at_level(logging.INFO):
        state = plan_mixture(mixture_config("data.mixture={RedPajamaC4: 1, RedPajamaArXiv: 0}"), SIZES, None)
    assert state == MixtureState.start({"RedPajamaC4": 1.0}, sorted(SIZES))
    said = [r.getMessage() for r in caplog.records if "not sampled" in r.getMessage()]
    assert said == ["data.mixture: not sampled (not named, or weight 0): RedPajamaArXiv, RedPajamaGithub"]


def checkpoint_with(tmp_path: Path, mixture: MixtureState | None) -> ckpt.Checkpoint:
    path = tmp_path / ckpt.tag_for(3)
    path.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(dataclasses.replace(sample_state(), mixture=mixture).to_json())
    return ckpt.Checkpoint(path, 3)


def test_on_resume_new_weights_are_honoured_and_turning_the_mixture_on_or_off_is_refused(tmp_path, caplog):
    _, saved = advance(MixtureState.start({"RedPajamaC4": 1.0}, sorted(SIZES)), 12)
    with_mixture = checkpoint_with(tmp_path / "mixed", saved)
    same = plan_mixture(mixture_config("data.mixture={RedPajamaC4: 1}"), SIZES, with_mixture)
    assert same == saved
    with caplog.at_level(logging.INFO):
        moved = plan_mixture(mixture_config("data.mixture={RedPajamaC4: 1, RedPajamaGithub: 1}"), SIZES, with_mixture)
    assert moved == saved.with_weights({"RedPajamaC4": 0.5, "RedPajamaGithub": 0.5}, sorted(SIZES))
    assert "data.mixture changes on resume at step 3" in caplog.text
    with pytest.raises(CheckpointError, match="trained with data.mixture=.*unset now: resume with a data.mixture"):
        plan_mixture(mixture_config(), SIZES, with_mixture)
    without = checkpoint_with(tmp_path / "plain", None)
    with pytest.raises(CheckpointError, match="trained in the global sample order.*resume without data.mixture"):
        plan_mixture(mixture_config("data.mixture={RedPajamaC4: 1}"), SIZES, without)
    assert plan_mixture(mixture_config(), SIZES, without) is None


# ---------------------------------------------------------------------------------------------- a real run

STEPS, BATCH, STOP = 40, 8, 20
WEIGHTS = {"RedPajamaCommonCrawl": 0.6, "RedPajamaArXiv": 0.3, "RedPajamaGithub": 0.1}  # CommonCrawl: 185 samples


@pytest.fixture(scope="module")
def by_source_64(tmp_path_factory, slimpajama_sample, tokenizer_model) -> Path:
    out = tmp_path_factory.mktemp("by_source_64")
    prepare_shards(PrepareConfig(input=str(slimpajama_sample), split="train", tokenizer=str(tokenizer_model),
                                 output=str(out), seq_len=SEQ, workers=2, pack_by_source=True, progress=False,
                                 verbose=False))
    return out


def mixture_run(run_dir: Path, shards: Path, model: Path, *extra: str) -> list[str]:
    mixture = "{" + ", ".join(f"{source}: {weight}" for source, weight in WEIGHTS.items()) + "}"
    return overrides(run_dir, shards, model, f"data.mixture={mixture}", f"train.global_batch_size={BATCH}",
                     f"train.max_tokens={STEPS * BATCH * SEQ}", f"checkpoint.every_steps={STOP}", *extra)


def ids_by_source(shards: Path) -> dict[str, set[int]]:
    """Each source's global sample ids, from the manifest's shard entries in order (independently of SourceIndex)."""
    out: dict[str, set[int]] = {}
    start = 0
    for entry in read_manifest(shards)["shards"]:
        out.setdefault(entry["source"], set()).update(range(start, start + entry["num_sequences"]))
        start += entry["num_sequences"]
    return out


@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory, by_source_64, tiny_init_model) -> dict:
    """40 steps on 2 ranks; then its step-20 checkpoint continued on 1 rank in another run dir."""
    work = tmp_path_factory.mktemp("mixture_runs")
    full = work / "full"
    full_out = run_ok(warm(2, mixture_run(full, by_source_64, tiny_init_model), work / "full.out"))
    resumed = work / "one_rank"
    step20 = ckpt.checkpoints_root(full) / ckpt.tag_for(STOP)
    resumed_out = run_ok(python(mixture_run(resumed, by_source_64, tiny_init_model, f"resume={step20}"),
                                work / "one_rank.out"))
    return {"full": full, "full_out": full_out, "resumed": resumed, "resumed_out": resumed_out}


def test_turning_the_mixture_off_without_an_hf_copy_suggests_an_export_that_exists(tmp_path, by_source_64,
                                                                                    tiny_init_model):
    """The refusal offered `model.init_from=STEP/model`, which checkpoint.save_hf=false never writes."""
    run_dir = tmp_path / "run"
    short = ("train.max_steps=2", "checkpoint.every_steps=2", "checkpoint.save_hf=false")
    run_ok(python(mixture_run(run_dir, by_source_64, tiny_init_model, *short), tmp_path / "mixed.out"))
    step = ckpt.checkpoints_root(run_dir) / ckpt.tag_for(2)
    assert step.is_dir() and not (step / ckpt.HF_DIR).exists()
    job = python(overrides(run_dir, by_source_64, tiny_init_model, f"train.global_batch_size={BATCH}",
                           "train.max_steps=4", *short[1:]), tmp_path / "plain.out")
    assert job.wait() == 2, job.output()[-3000:]
    errors = [line for line in job.output().splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in job.output(), job.output()[-3000:]
    assert f"`python launch/export_hf.py --checkpoint {step} --out DIR`, then model.init_from=DIR" in errors[0]
    assert f"{step}/{ckpt.HF_DIR}" not in errors[0], errors[0]


def test_a_2_rank_run_reads_each_source_at_its_weight_in_its_own_order(mixed_runs, by_source_64):
    log = read_log(mixed_runs["full"])
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    total_weight = sum(Fraction(w) for w in WEIGHTS.values())
    weights = {s: float(Fraction(WEIGHTS.get(s, 0)) / total_weight) for s in sorted(ids_by_source(by_source_64))}
    members = ids_by_source(by_source_64)
    cumulative = {source: 0 for source in members}
    read: dict[str, list[int]] = {source: [] for source in members}
    for record in log:
        assert record["domain_weights"] == pytest.approx(weights, abs=1e-15)
        counts = record["domain_samples"]
        assert list(counts) == sorted(members) and sum(counts.values()) == BATCH
        ids = iter(record["sample_ids"])  # the global batch: each source's samples, sources in name order
        for source, count in counts.items():
            cumulative[source] += count
            assert abs(cumulative[source] - weights[source] * BATCH * record["step"]) < 1 + 1e-9
            mine = [next(ids) for _ in range(count)]
            assert set(mine) <= members[source], (record["step"], source)
            read[source] += mine
    for source, order in read.items():
        size = len(members[source])
        for epoch in range(0, len(order), size):
            assert len(set(order[epoch : epoch + size])) == len(order[epoch : epoch + size])  # no repeat in an epoch
        assert (len(order) > 0) == (WEIGHTS.get(source, 0) > 0)
    assert set(read["RedPajamaCommonCrawl"][:185]) == members["RedPajamaCommonCrawl"]  # read through, then again
    assert len(read["RedPajamaCommonCrawl"]) > 185
    output = mixed_runs["full_out"]
    assert "data.mixture: not sampled (not named, or weight 0): RedPajamaC4, RedPajamaStackExchange, " \
           "RedPajamaWikipedia" in output
    assert "data.mixture: RedPajamaCommonCrawl has been read through; its epoch 1 begins at step" in output
    state = json.loads((ckpt.checkpoints_root(mixed_runs["full"]) / ckpt.tag_for(STEPS) / ckpt.STATE_FILE)
                       .read_text())
    assert state["format_version"] == 2 and state["mixture"]["consumed"] == cumulative


def test_resumed_on_1_rank_from_step_20_it_reads_the_same_samples(mixed_runs):
    assert "re-partitioned from 2" in mixed_runs["resumed_out"]
    reference = {r["step"]: r for r in read_log(mixed_runs["full"])}
    resumed = read_log(mixed_runs["resumed"])
    assert [r["step"] for r in resumed] == list(range(STOP + 1, STEPS + 1))
    for record in resumed:
        expected = reference[record["step"]]
        for key in ("sample_ids", "domain_samples", "domain_weights", "tokens"):
            assert record[key] == expected[key], (key, record["step"])
        assert abs(record["loss"] - expected["loss"]) <= 1e-4 * abs(expected["loss"]), (record, expected)
