"""The encoder benchmark against references with known faults: a PyTorch model with one weight
changed must show in max_abs_diff by the change's effect, and one slowed by a known sleep must
show in torch items/s and speedup; plus its JSON and table, the Flax timer, and its errors."""

from __future__ import annotations

import contextlib
import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from benchmarks import encoders
from conftest import assert_usage_error, save_random_model
from vlcore.hf_checkpoint import load_pretrained

ROW_KEYS = {"model", "batch", "max_abs_diff", "flax_items_per_s", "torch_items_per_s", "speedup", "dtype"}
ATOL = 1e-4  # fp32 parity of the two implementations (conftest.ATOL)
BATCH = 3  # the batch the fault tests run at; the CLI runs 1 and 3
DELTA = 0.05  # added to one weight of the reference: far above ATOL in what it changes
SLEEP = 0.1  # added before each forward of a slowed reference: >> the tiny models' own time (~1 ms)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread while these tests run: with two on a busy 2-core machine, its OpenMP
    workers wait up to ~200 ms for a core, so a tiny forward takes 0.5 to 200 ms, like SLEEP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(random_clip_dir, random_bert_dir):
    """{"clip": dir, "bert": dir}: the conftest's random HF checkpoints."""
    return {"clip": random_clip_dir[1], "bert": random_bert_dir[1]}


@pytest.fixture(scope="module", params=["clip", "bert"])
def cli_run(request, checkpoints, tmp_path_factory):
    """(kind, JSON result, printed stdout) of the CLI on the honest checkpoint, batches 1 and 3."""
    kind, directory = request.param, checkpoints[request.param]
    out = tmp_path_factory.mktemp("cli") / "r.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = encoders.main(["--hf-dir", str(directory), "--batches", f"1,{BATCH}", "--iters", "3",
                              "--seq-len", "8", "--out", str(out)])
    assert code == 0
    return kind, json.loads(out.read_text()), printed.getvalue()


def bench(kind: str, directory, ref: torch.nn.Module) -> list[encoders.Row]:
    """The benchmark's rows at BATCH (3 timed calls) of the Flax model of `directory` against `ref`,
    named like the CLI's rows."""
    pre, rng = load_pretrained(directory), np.random.default_rng(0)
    if kind == "clip":
        return encoders.bench_clip(pre, ref, directory.name, [BATCH], 3, rng)
    return encoders.bench_bert(pre, ref, directory.name, [BATCH], 3, 8, rng)


def test_cli_writes_rows_that_match_on_honest_weights(cli_run):
    kind, result, printed = cli_run
    assert result["device"].startswith("cpu")
    outputs = (["image_embeds", "text_embeds", "logits"] if kind == "clip"
               else ["last_hidden_state", "sentence_embedding"])
    assert [(r["model"].split("/")[1], r["batch"]) for r in result["rows"]] == [
        (o, b) for b in (1, BATCH) for o in outputs]
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["max_abs_diff"] <= ATOL  # the PyTorch model ran on the same weights and inputs
    lines = printed.splitlines()
    assert lines[1].split() == ["model", "batch", "dtype", "max_abs_diff", "flax/s", "torch/s", "speedup"]
    assert [line.split()[0] for line in lines[3:]] == [r["model"] for r in result["rows"]]


def test_changed_bert_weight_shows_in_max_abs_diff_by_its_effect(checkpoints):
    ref = encoders.load_reference("bert", checkpoints["bert"])
    with torch.no_grad():  # the last LayerNorm's bias: channel 0 of every token's output moves by DELTA
        ref.encoder.layer[-1].output.LayerNorm.bias[0] += DELTA
    hidden, sentence = bench("bert", checkpoints["bert"], ref)
    assert hidden.max_abs_diff == pytest.approx(DELTA, abs=ATOL)
    assert sentence.max_abs_diff > ATOL


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_changed_clip_tower_weight_shows_in_that_towers_rows_only(checkpoints, tower):
    ref = encoders.load_reference("clip", checkpoints["clip"])
    # The tower's last LayerNorm bias: its pooled features [B, H] move by DELTA in channel 0, so its
    # embeddings (pooled @ W^T, W [P, H]) move by DELTA * W[:, 0]; the other tower is untouched.
    norm, projection = ((ref.vision_model.post_layernorm, ref.visual_projection) if tower == "vision"
                        else (ref.text_model.final_layer_norm, ref.text_projection))
    with torch.no_grad():
        norm.bias[0] += DELTA
    expected = DELTA * float(projection.weight[:, 0].abs().max().detach())
    assert expected > 10 * ATOL
    image, text, logits = bench("clip", checkpoints["clip"], ref)
    changed, unchanged = (image, text) if tower == "vision" else (text, image)
    assert changed.max_abs_diff == pytest.approx(expected, abs=ATOL)
    assert unchanged.max_abs_diff <= ATOL
    assert logits.max_abs_diff > ATOL


def sleep_before_forward(ref: torch.nn.Module, kind: str) -> None:
    """Makes every forward of the towers of `ref` SLEEP seconds slower (CLIP's logits run both)."""
    towers = [ref.vision_model, ref.text_model] if kind == "clip" else [ref]
    for tower in towers:
        tower.register_forward_pre_hook(lambda *_: time.sleep(SLEEP))


def test_slowed_reference_shows_in_torch_speed_and_speedup(cli_run, checkpoints):
    kind, result, _ = cli_run
    honest = {r["model"]: r for r in result["rows"] if r["batch"] == BATCH}
    ref = encoders.load_reference(kind, checkpoints[kind])
    sleep_before_forward(ref, kind)
    for row in bench(kind, checkpoints[kind], ref):
        slept = SLEEP * (2 if row.model.endswith("/logits") else 1)  # seconds per call of the reference
        # Items per second of one call: at most BATCH / slept (the timer saw the whole forward); the
        # model's own time adds far less than 150% to it, while a rate per batch instead of per item
        # (1/3 here) or the sum of the 3 timed calls (1/3) would fall below 0.4.
        assert 0.4 * BATCH / slept <= row.torch_items_per_s <= BATCH / slept, row
        # Flax did not change, PyTorch got ~100x slower: the speedup rises (an inverted ratio falls).
        assert row.speedup > 5 * honest[row.model]["speedup"], (row, honest[row.model])


def test_time_flax_waits_for_the_result():
    """JAX dispatches asynchronously: without blocking, the timer would report microseconds."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((512, 512)) / np.sqrt(512), jnp.float32)
    fn = jax.jit(lambda a: a @ a @ a @ a @ a @ a @ a @ a)  # [512, 512]: 7 matmuls, ~2 GFLOP
    out, seconds = encoders.time_flax(fn, (a,), 3)
    np.testing.assert_allclose(out, fn(a), rtol=1e-6)
    assert seconds >= 0.5 * best_seconds(lambda: fn(a))


def best_seconds(fn, tries: int = 3) -> float:
    """Fastest of `tries` calls of `fn`, each waited for (fn compiled already)."""
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def test_missing_hf_dir_exits_nonzero_without_output(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert encoders.main(["--hf-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args", [["--batches", "0,8"], ["--batches", "a"], ["--iters", "0"], ["--regions", "0"],
                                  ["--seq-len", "1"]])
def test_bad_arguments_exit_with_usage_error_and_no_output(tmp_path, args):
    out = tmp_path / "r.json"
    assert_usage_error(encoders.main, [*args, "--out", str(out)], out)


def test_missing_output_directory_is_a_usage_error():
    assert_usage_error(encoders.main, ["--out", "/nonexistent-dir/r.json"])


# ----------------------------------------------------------------------------- VisualBERT directories

VISUAL_BERT_HEADS = {"VisualBertModel": "pooler_output", "VisualBertForPreTraining": "prediction_logits",
                     "VisualBertForRegionToPhraseAlignment": "logits"}


@pytest.fixture(scope="module", params=list(VISUAL_BERT_HEADS))
def visual_bert_dir(request, tmp_path_factory):
    """(class name, dir) of a tiny random VisualBERT of that class (its config's architectures)."""
    config = transformers.VisualBertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, visual_embedding_dim=12, num_labels=3, initializer_range=0.2)
    _, directory = save_random_model(getattr(transformers, request.param), config,
                                     tmp_path_factory.mktemp("visual-bert"), seed=21)
    return request.param, directory


def test_cli_accepts_a_visual_bert_dir(visual_bert_dir, tmp_path):
    class_name, directory = visual_bert_dir
    out = tmp_path / "r.json"
    with contextlib.redirect_stdout(io.StringIO()):
        code = encoders.main(["--hf-dir", str(directory), "--batches", f"1,{BATCH}", "--iters", "2",
                              "--seq-len", "8", "--regions", "5", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    head = VISUAL_BERT_HEADS[class_name]
    assert [(r["model"].split("/")[1], r["batch"]) for r in rows] == [
        (o, b) for b in (1, BATCH) for o in ("last_hidden_state", head)]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["max_abs_diff"] <= ATOL, row


def test_changed_visual_projection_shows_in_visual_bert_rows(visual_bert_dir):
    """The region path is compared: a changed visual_projection bias moves the region tokens."""
    class_name, directory = visual_bert_dir
    ref = encoders.load_reference("visual_bert", directory, class_name)
    base = ref if class_name == "VisualBertModel" else ref.visual_bert
    with torch.no_grad():
        base.embeddings.visual_projection.bias[0] += 10 * DELTA
    rows = encoders.bench_visual_bert(load_pretrained(directory), ref, directory.name, [BATCH], 1, 8, 5,
                                      np.random.default_rng(0))
    assert rows[0].model.endswith("/last_hidden_state") and rows[0].max_abs_diff > 10 * ATOL


# ----------------------------------------------------------------------------- the encoding job

JOB_STAGES = ["bare encoder", "encode_images", "input pipeline (images)", "input pipeline (+ captions)",
              "encode job (images)", "text encoder (once)", "encode job (+ captions, once)"]
JOB_EXAMPLES, JOB_BATCH = 300, 64  # the last batch is partial: 4 full batches + 44


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """(JSON result, printed stdout) of the CLI's default run (random quick-architecture tower, a
    generated world) on JOB_EXAMPLES memory examples at batch JOB_BATCH."""
    from benchmarks import encode_job

    out = tmp_path_factory.mktemp("job") / "r.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = encode_job.main(["--examples", str(JOB_EXAMPLES), "--batch", str(JOB_BATCH), "--repeats", "2",
                                "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_job_benchmark_counts_every_example_of_the_split_in_every_stage(job_run):
    result, printed = job_run
    assert result["dataset"] == f"vl_world/memory{JOB_EXAMPLES}" and result["split"] == "memory"
    assert result["encoder"].startswith("two_tower:") and result["batch"] == JOB_BATCH
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == JOB_STAGES
    # What each stage processed, counted by the stage: memory rows written, examples yielded,
    # embeddings returned; the bare encoder runs as many full batches as the job encodes.
    assert rows["bare encoder"]["examples"] == -(-JOB_EXAMPLES // JOB_BATCH) * JOB_BATCH == 320
    for stage in JOB_STAGES[1:]:
        assert rows[stage]["examples"] == JOB_EXAMPLES, rows[stage]
    bare = rows["bare encoder"]["examples_per_s"]
    for row in rows.values():
        assert set(row) == {"stage", "examples", "seconds", "examples_per_s", "cpu_s", "vs_bare"}
        assert row["examples_per_s"] == pytest.approx(row["examples"] / row["seconds"])
        assert row["vs_bare"] == pytest.approx(row["examples_per_s"] / bare)
        assert 0 < row["cpu_s"]
    assert result["encode_job_vs_bare"] == rows["encode job (images)"]["vs_bare"]
    lines = printed.splitlines()
    assert lines[1].split() == ["stage", "examples", "seconds", "examples/s", "cores", "vs_bare"]
    assert [line[:32].strip() for line in lines[3:3 + len(JOB_STAGES)]] == JOB_STAGES
    assert lines[-2].startswith(f"encode job / bare encoder: {result['encode_job_vs_bare']:.2f} (")
    towers_s = (rows["bare encoder"]["seconds"] * JOB_EXAMPLES / 320 + rows["text encoder (once)"]["seconds"])
    assert result["caption_job_vs_towers"] == pytest.approx(
        towers_s / rows["encode job (+ captions, once)"]["seconds"])
    assert lines[-1] == ("encode job (+ captions) / (bare encoder + text encoder): "
                         f"{result['caption_job_vs_towers']:.2f}")


def test_bare_encoder_computes_what_the_job_stores(tmp_path):
    """The benchmark's reference is the job's own image tower: the same embeddings, on the devices."""
    from benchmarks import encode_job
    from vlcore.frozen_encoders import TwoTowerEncoder
    from vlcore.tfds_pairs import pair_batches

    encoder = TwoTowerEncoder(encode_job.random_two_tower(tmp_path / "two_tower"), batch_size=32)
    assert encoder.model_record["vision"]["num_hidden_layers"] == 3 and encoder.image_size == 64  # quick preset
    builder = encode_job.memory_world(tmp_path / "tfds", 40)
    assert builder.info.splits["memory"].num_examples == 40
    images = next(pair_batches(builder, "memory", caption_key=None, batch_size=32))["image"]
    bare, sharding = encode_job.bare_encoder(encoder)
    np.testing.assert_allclose(np.asarray(bare(jax.device_put(images, sharding))), encoder.encode_images(images),
                               atol=1e-6)


def test_caption_variants_keep_every_captions_token_count(tmp_path):
    """The text stages run on the captions with their words reversed (warm-up) and rotated (timed):
    new sentences for the text tower's cache, but the same padded lengths, so no compilation."""
    from benchmarks import encode_job
    from vlcore.hf_checkpoint import load_tokenizer
    from vlcore.sentence_encoder import bundled_minilm_path
    from vlcore.tfds_pairs import pair_batches

    captions = list(next(pair_batches(encode_job.memory_world(tmp_path, 64), "memory", batch_size=64))["caption"])
    tokenizer = load_tokenizer(bundled_minilm_path())
    lengths = lambda texts: [len(ids) for ids in tokenizer(texts)["input_ids"]]  # noqa: E731
    for variant in (encode_job.reversed_words(captions), encode_job.rotated_words(captions)):
        assert lengths(variant) == lengths(captions)
        assert not set(variant) & set(captions)


@pytest.mark.parametrize("args", [["--examples", "0"], ["--batch", "0"], ["--repeats", "0"],
                                  ["--two-tower", "/nonexistent-dir"], ["--data-dir", "/nonexistent-dir"],
                                  ["--world-config", "huge"], ["--out", "/nonexistent-dir/r.json"]])
def test_job_benchmark_bad_arguments_exit_with_usage_error(tmp_path, args):
    from benchmarks import encode_job

    out = tmp_path / "r.json"
    assert_usage_error(encode_job.main, [*args, *([] if "--out" in args else ["--out", str(out)])], out)


def test_job_benchmark_on_an_unprepared_world_exits_2_without_output(tmp_path, capsys):
    from benchmarks import encode_job

    out = tmp_path / "r.json"
    assert encode_job.main(["--data-dir", str(tmp_path), "--world-config", "tiny", "--out", str(out)]) == 2
    assert "no prepared vl_world/tiny" in capsys.readouterr().err
    assert not out.exists()
