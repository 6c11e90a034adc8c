"""Verification and speed of the Flax encoders against transformers' PyTorch models, in one run.

    python -m benchmarks.encoders --out encoders.json
    python -m benchmarks.encoders --hf-dir /path/to/clip-or-bert --batches 1,8 --out r.json

For each model and batch size it runs both implementations on the same weights and inputs and
reports the max abs difference of the outputs and items/s for both (Flax timed after
compilation; PyTorch with its default thread count), with their ratio. Default models: a CLIP
with exactly the openai/clip-vit-base-patch32 shapes (random weights, generated here) and the
bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_description, median_seconds, print_table, write_json
from vlcore.encoders.clip import CLIPModel
from vlcore.hf_checkpoint import CheckpointError, Pretrained, load_pretrained, read_hf_config
from vlcore.sentence_encoder import bundled_minilm_path, sentence_embedding


@dataclasses.dataclass
class Row:
    model: str
    batch: int
    max_abs_diff: float
    flax_items_per_s: float
    torch_items_per_s: float
    speedup: float
    dtype: str


def time_flax(fn, args, iters: int):
    """Compiles, checks one result, then times `iters` calls to completion."""
    out = jax.block_until_ready(fn(*args))
    seconds = median_seconds(lambda: jax.block_until_ready(fn(*args)), iters)
    return jax.tree.map(np.asarray, out), seconds


def time_torch(fn, iters: int):
    import torch

    with torch.inference_mode():
        out = fn()
        seconds = median_seconds(fn, iters)
    return out, seconds


def text_inputs(rng: np.random.Generator, batch: int, seq: int, vocab: int, eos: int | None, pad: int):
    """Random token ids with a varied real length per row (padding after it), EOS last when given."""
    ids = rng.integers(3, min(vocab, 1000) - 1, size=(batch, seq))
    lengths = rng.integers(max(2, seq // 2), seq + 1, size=batch)
    lengths[0] = seq  # at least one unpadded row
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    if eos is not None:
        ids[np.arange(batch), lengths - 1] = eos
    ids = np.where(mask == 1, ids, pad)
    return ids.astype(np.int64), mask


def load_reference(kind: str, directory: Path):
    """transformers' PyTorch model ("clip": CLIPModel, else BertModel) of an HF directory, in eval mode."""
    import transformers

    cls = transformers.CLIPModel if kind == "clip" else transformers.BertModel
    return cls.from_pretrained(str(directory), attn_implementation="sdpa").eval()


def bench_clip(pre: Pretrained, ref, name: str, batches, iters, rng) -> list[Row]:
    """Rows for image embeddings, text embeddings and logits of the Flax `pre` against `ref`, the
    PyTorch CLIPModel (normally load_reference("clip", the same directory); tests pass altered ones)."""
    import torch

    cfg = pre.config
    module, params = pre.module, pre.params
    image_fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=CLIPModel.get_image_features))
    text_fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, method=CLIPModel.get_text_features))
    full_fn = jax.jit(lambda p, x, i, m: module.apply({"params": p}, x, i, m))
    dtype = jnp.dtype(module.dtype).name
    rows = []
    for batch in batches:
        size = cfg.vision.image_size
        images = rng.standard_normal((batch, size, size, cfg.vision.num_channels)).astype(np.float32)
        eos = cfg.text.eos_token_id if cfg.text.eos_token_id != 2 else cfg.text.vocab_size - 1
        ids, mask = text_inputs(rng, batch, cfg.text.max_position_embeddings, cfg.text.vocab_size, eos, 0)
        t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        got, f_s = time_flax(image_fn, (params, images), iters)
        want, t_s = time_torch(lambda: ref.get_image_features(pixel_values=t_images).pooler_output.numpy(), iters)
        rows.append(make_row(f"{name}/image_embeds", batch, got, want, f_s, t_s, dtype))

        got, f_s = time_flax(text_fn, (params, ids, mask), iters)
        want, t_s = time_torch(lambda: ref.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output.numpy(), iters)
        rows.append(make_row(f"{name}/text_embeds", batch, got, want, f_s, t_s, dtype))

        got, f_s = time_flax(full_fn, (params, images, ids, mask), iters)
        want, t_s = time_torch(lambda: ref(pixel_values=t_images, input_ids=t_ids, attention_mask=t_mask).logits_per_image.numpy(), iters)
        rows.append(make_row(f"{name}/logits", batch, got["logits_per_image"], want, f_s, t_s, dtype))
    return rows


def bench_bert(pre: Pretrained, ref, name: str, batches, iters, seq: int, rng) -> list[Row]:
    """Rows for the last hidden state and the sentence embedding of the Flax `pre` against `ref`, the
    PyTorch BertModel (normally load_reference("bert", the same directory); tests pass altered ones)."""
    import torch

    module, params, cfg = pre.module, pre.params, pre.config
    dtype = jnp.dtype(module.dtype).name

    def sentence(p, i, m):
        hidden = module.apply({"params": p}, i, m)["last_hidden_state"]
        return hidden, sentence_embedding(hidden, m)

    fn = jax.jit(sentence)
    rows = []
    for batch in batches:
        ids, mask = text_inputs(rng, batch, min(seq, cfg.max_position_embeddings), cfg.vocab_size, None, cfg.pad_token_id)
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        def torch_sentence():
            hidden = ref(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            m = t_mask[..., None].float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return hidden.numpy(), torch.nn.functional.normalize(pooled, dim=-1).numpy()

        (hidden, emb), f_s = time_flax(fn, (params, ids, mask), iters)
        (t_hidden, t_emb), t_s = time_torch(torch_sentence, iters)
        # Padded positions are excluded: their values are arbitrary in both implementations.
        valid = mask.astype(bool)
        rows.append(make_row(f"{name}/last_hidden_state", batch, hidden[valid], t_hidden[valid], f_s, t_s, dtype))
        rows.append(make_row(f"{name}/sentence_embedding", batch, emb, t_emb, f_s, t_s, dtype))
    return rows


def make_row(model, batch, got, want, flax_s, torch_s, dtype) -> Row:
    diff = float(np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
    flax_ips, torch_ips = batch / flax_s, batch / torch_s
    return Row(model, batch, diff, flax_ips, torch_ips, flax_ips / torch_ips, dtype)


def clip_b32_checkpoint(directory: Path, seed: int) -> Path:
    """A CLIP with exactly the openai/clip-vit-base-patch32 shapes and random (HF-initialised) weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(projection_dim=512)  # HF defaults are the ViT-B/32 shapes
    transformers.CLIPModel(config).save_pretrained(str(directory))
    return directory


TABLE = [("model", "model", "<36"), ("batch", "batch", ">5"), ("dtype", "dtype", ">8"),
         ("max_abs_diff", "max_abs_diff", ">12.2e"), ("flax/s", "flax_items_per_s", ">9.1f"),
         ("torch/s", "torch_items_per_s", ">9.1f"), ("speedup", "speedup", ">7.2f")]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", type=Path, help="a local HF CLIP or BERT checkpoint instead of the default models")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per measurement; the median is reported")
    p.add_argument("--seq-len", type=int, default=64, help="token length for BERT models (CLIP uses its 77)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="Flax compute dtype (parameters stay float32); PyTorch runs in float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write {'device', 'rows': [...]} here as JSON")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        if any(b < 1 for b in args.batches):
            raise ValueError
    except ValueError:
        p.error(f"--batches: expected comma-separated positive integers, got {args.batches!r}")
    if args.iters < 1:
        p.error("--iters must be at least 1")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: directory {args.out.parent} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.hf_dir is not None:
            try:
                kind = read_hf_config(args.hf_dir).model_type
                pre = load_pretrained(args.hf_dir, dtype=dtype)
            except CheckpointError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            name = args.hf_dir.name or str(args.hf_dir)
            models = [(kind, pre, args.hf_dir, name)]
        else:
            clip_dir = clip_b32_checkpoint(Path(tmp) / "clip-vit-b32-shapes", args.seed)
            minilm = bundled_minilm_path()
            models = [
                ("clip", load_pretrained(clip_dir, dtype=dtype), clip_dir, "clip-vit-b32-shapes"),
                ("bert", load_pretrained(minilm, dtype=dtype), minilm, "all-MiniLM-L6-v2"),
            ]
        for kind, pre, directory, name in models:
            ref = load_reference(kind, directory)
            if kind == "clip":
                rows += bench_clip(pre, ref, name, args.batches, args.iters, rng)
            else:
                rows += bench_bert(pre, ref, name, args.batches, args.iters, args.seq_len, rng)
            print(f"... {name} done", file=sys.stderr)
    device = device_description()
    print(f"device: {device}; torch threads: {torch.get_num_threads()}")
    print_table(rows, TABLE)
    if args.out is not None:
        write_json(args.out, {"device": device, "torch_threads": torch.get_num_threads(),
                              "rows": [dataclasses.asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
