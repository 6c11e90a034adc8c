"""Verification and speed of the Flax encoders against transformers' PyTorch models, in one run.

    python -m benchmarks.encoders --out encoders.json
    python -m benchmarks.encoders --hf-dir /path/to/clip-or-bert --batches 1,8 --out r.json
    python -m benchmarks.encoders --hf-dir /path/to/visual-bert --seq-len 32 --regions 36

For each model and batch size it runs both implementations on the same weights and inputs and
reports the max abs difference of the outputs and items/s for both (Flax timed after
compilation; PyTorch with its default thread count), with their ratio. Default models: a CLIP
with exactly the openai/clip-vit-base-patch32 shapes (random weights, generated here) and the
bundled all-MiniLM-L6-v2. A VisualBERT directory runs as the class its config.json's
`architectures` names (VisualBertModel or a head model) on random text and region features of
its config's shapes (--seq-len tokens, --regions regions, both with padded rows).
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
from vlcore.encoders.visual_bert import VisualBertForRegionToPhraseAlignment
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


def load_reference(kind: str, directory: Path, class_name: str | None = None):
    """transformers' PyTorch model of an HF directory, in eval mode: "clip": CLIPModel, "bert":
    BertModel, "visual_bert": `class_name` (default VisualBertModel; transformers' VisualBERT has
    no SDPA attention, so it runs its eager one)."""
    import transformers

    if kind == "visual_bert":
        cls = getattr(transformers, class_name or "VisualBertModel")
        return cls.from_pretrained(str(directory), attn_implementation="eager").eval()
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


def region_inputs(rng: np.random.Generator, batch: int, regions: int, dim: int):
    """Random region features [batch, regions, dim] and a 1/0 mask with a varied number of real regions."""
    feats = rng.standard_normal((batch, regions, dim)).astype(np.float32)
    lengths = rng.integers(max(1, regions // 2), regions + 1, size=batch)
    lengths[0] = regions
    return feats, (np.arange(regions)[None] < lengths[:, None]).astype(np.int64)


# The output each VisualBERT class is benchmarked on besides last_hidden_state.
VISUAL_BERT_HEAD_OUTPUT = {"VisualBertModel": "pooler_output", "VisualBertForPreTraining": "prediction_logits",
                           "VisualBertForQuestionAnswering": "logits", "VisualBertForVisualReasoning": "logits",
                           "VisualBertForRegionToPhraseAlignment": "logits"}


def bench_visual_bert(pre: Pretrained, ref, name: str, batches, iters, seq: int, regions: int, rng) -> list[Row]:
    """Rows for last_hidden_state (real text and regions only) and the class's head output (see
    VISUAL_BERT_HEAD_OUTPUT; masked regions left out of the region-to-phrase scores) of the Flax
    `pre` against `ref`, transformers' model of the same class (normally load_reference)."""
    import torch

    module, params, cfg = pre.module, pre.params, pre.config
    class_name = type(module).__name__
    head = VISUAL_BERT_HEAD_OUTPUT[class_name]
    if head == "pooler_output" and not module.add_pooling_layer:
        head = None
    dtype = jnp.dtype(module.dtype).name
    r2p = isinstance(module, VisualBertForRegionToPhraseAlignment)
    fn = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    rows = []
    for batch in batches:
        ids, mask = text_inputs(rng, batch, min(seq, cfg.max_position_embeddings), cfg.vocab_size, None,
                                cfg.pad_token_id)
        types = (rng.integers(0, cfg.type_vocab_size, size=ids.shape) * mask).astype(np.int64)
        feats, vmask = region_inputs(rng, batch, regions, cfg.visual_embedding_dim)
        inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, visual_embeds=feats,
                      visual_attention_mask=vmask)
        if r2p:
            # Phrases are real text tokens (every row has at least max(2, seq // 2)); -1 means token 0.
            inputs["region_to_phrase_position"] = rng.integers(-1, max(2, ids.shape[1] // 2), size=(batch, ids.shape[1]))
        t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

        def torch_forward():
            out = ref(**t_inputs, output_hidden_states=True)
            result = {"last_hidden_state": out.hidden_states[-1].numpy()}
            if head is not None:
                result[head] = getattr(out, head).numpy()
            return result

        got, f_s = time_flax(fn, (params, {k: jnp.asarray(v) for k, v in inputs.items()}), iters)
        want, t_s = time_torch(torch_forward, iters)
        valid = np.concatenate([mask, vmask], axis=1).astype(bool)  # padded tokens are arbitrary on both sides
        rows.append(make_row(f"{name}/last_hidden_state", batch, got["last_hidden_state"][valid],
                             want["last_hidden_state"][valid], f_s, t_s, dtype))
        if head == "prediction_logits":
            got_head, want_head = got[head][valid], want[head][valid]
        elif r2p:
            real = np.broadcast_to(vmask.astype(bool)[:, None, :], got[head].shape)
            got_head, want_head = got[head][real], want[head][real]
        elif head is not None:
            got_head, want_head = got[head], want[head]
        if head is not None:
            rows.append(make_row(f"{name}/{head}", batch, got_head, want_head, f_s, t_s, dtype))
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
    p.add_argument("--hf-dir", type=Path,
                   help="a local HF CLIP, BERT or VisualBERT checkpoint instead of the default models")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per measurement; the median is reported")
    p.add_argument("--seq-len", type=int, default=64, help="token length for BERT models (CLIP uses its 77)")
    p.add_argument("--regions", type=int, default=36, help="region features per example for VisualBERT models")
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
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2")
    if args.regions < 1:
        p.error("--regions must be at least 1")
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
            ref = load_reference(kind, directory, type(pre.module).__name__)
            if kind == "clip":
                rows += bench_clip(pre, ref, name, args.batches, args.iters, rng)
            elif kind == "visual_bert":
                rows += bench_visual_bert(pre, ref, name, args.batches, args.iters, args.seq_len, args.regions, rng)
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
