#!/usr/bin/env python3
"""Convert a CTranslate2 Whisper model (faster-whisper layout: model.bin, config.json,
tokenizer.json, vocabulary.txt) into a Hugging Face transformers Whisper directory.

Needs only numpy and safetensors. Written from the on-disk format (version 6):

    u32 binary_version, str spec_name, u32 spec_revision,
    u32 n_variables, n x { str name, u8 rank, rank x u32 dim, u8 dtype, u32 n_bytes, bytes },
    u32 n_aliases,   n x { str alias, str target }

where `str` is a u16 byte length (including a trailing NUL) then the UTF-8 bytes and the NUL,
and dtype indexes (float32, int8, int16, int32, float16, bfloat16). All little-endian.

Usage: ct2_to_hf.py CT2_DIR OUT_DIR [--dtype f32|f16]

The HF files that the CTranslate2 package does not carry are reconstructed as
openai/whisper-tiny.en ships them; see RECONSTRUCTED below and the report in
tests/fixtures/whisper-tiny-en/README.md.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save_file

DTYPES = [np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16"]


def read_ct2(path):
    """Returns ({name: ndarray}, {alias: target}, spec_name)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value[0]

    def string():
        nonlocal pos
        n = take("H")
        raw = data[pos : pos + n]
        pos += n
        if n == 0 or raw[-1] != 0:
            raise ValueError(f"{path}: malformed string at byte {pos - n}")
        return raw[:-1].decode("utf-8")

    version = take("I")
    if version not in (5, 6):
        raise ValueError(f"{path}: CTranslate2 binary version {version} (expected 5 or 6)")
    spec = string()
    take("I")  # spec revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype = DTYPES[take("B")]
        n_bytes = take("I")
        raw = data[pos : pos + n_bytes]
        pos += n_bytes
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype)
        variables[name] = array.reshape(shape)
    aliases = {}
    if pos < len(data):
        for _ in range(take("I")):
            alias = string()
            aliases[alias] = string()
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} trailing bytes")
    return variables, aliases, spec


def scalar(variables, name):
    return int(variables[name].reshape(-1)[0])


def convert_weights(v, dtype):
    """Maps CTranslate2 WhisperSpec variable names to HF WhisperForConditionalGeneration keys."""
    out = {}

    def put(key, array):
        out[key] = np.ascontiguousarray(array.astype(dtype))

    def linear(hf, ct2, bias=True):
        put(f"{hf}.weight", v[f"{ct2}/weight"])
        if bias:
            put(f"{hf}.bias", v[f"{ct2}/bias"])

    def norm(hf, ct2):
        put(f"{hf}.weight", v[f"{ct2}/gamma"])
        put(f"{hf}.bias", v[f"{ct2}/beta"])

    def split_qkv(hf, ct2, d):
        # Fused [q; k; v] projection. HF's k_proj has no bias: CTranslate2 stores zeros there.
        w, b = v[f"{ct2}/weight"], v[f"{ct2}/bias"]
        if np.any(b[d : 2 * d] != 0):
            raise ValueError(f"{ct2}: non-zero key bias cannot be represented in HF Whisper")
        put(f"{hf}.q_proj.weight", w[:d])
        put(f"{hf}.q_proj.bias", b[:d])
        put(f"{hf}.k_proj.weight", w[d : 2 * d])
        put(f"{hf}.v_proj.weight", w[2 * d :])
        put(f"{hf}.v_proj.bias", b[2 * d :])

    def split_kv(hf, ct2, d):
        w, b = v[f"{ct2}/weight"], v[f"{ct2}/bias"]
        if np.any(b[:d] != 0):
            raise ValueError(f"{ct2}: non-zero key bias cannot be represented in HF Whisper")
        put(f"{hf}.k_proj.weight", w[:d])
        put(f"{hf}.v_proj.weight", w[d:])
        put(f"{hf}.v_proj.bias", b[d:])

    d = v["encoder/conv1/weight"].shape[0]
    for side in ("encoder", "decoder"):
        if f"{side}/pre_norm" in v and scalar(v, f"{side}/pre_norm") != 1:
            raise ValueError(f"{side}: post-norm layers are not Whisper")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.encoder.embed_positions.weight", v["encoder/position_encodings/encodings"])
    n_enc = 0
    while f"encoder/layer_{n_enc}/ffn/linear_0/weight" in v:
        hf, ct = f"model.encoder.layers.{n_enc}", f"encoder/layer_{n_enc}"
        split_qkv(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", d)
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        n_enc += 1
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    put("model.decoder.embed_tokens.weight", v["decoder/embeddings/weight"])
    put("model.decoder.embed_positions.weight", v["decoder/position_encodings/encodings"])
    n_dec = 0
    while f"decoder/layer_{n_dec}/ffn/linear_0/weight" in v:
        hf, ct = f"model.decoder.layers.{n_dec}", f"decoder/layer_{n_dec}"
        split_qkv(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", d)
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        split_kv(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", d)
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        n_dec += 1
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    return out, n_enc, n_dec


def build_tokenizer(ct2_dir, vocab_size):
    """tokenizer.json: the package's (it is the HF one faster-whisper copies), plus the timestamp
    tokens <|0.00|>..<|30.00|> of vocabulary.txt as added tokens so every id decodes."""
    with open(os.path.join(ct2_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(ct2_dir, "vocabulary.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    if len(vocab) != vocab_size:
        raise ValueError(f"vocabulary.txt has {len(vocab)} tokens, model has {vocab_size}")
    have = {t["id"] for t in tok["added_tokens"]} | set(tok["model"]["vocab"].values())
    for i, content in enumerate(vocab):
        if i in have:
            continue
        tok["added_tokens"].append(
            {
                "id": i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    return tok, vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ct2_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    args = ap.parse_args()

    variables, aliases, spec = read_ct2(os.path.join(args.ct2_dir, "model.bin"))
    if spec != "WhisperSpec":
        sys.exit(f"{args.ct2_dir}: spec {spec} is not WhisperSpec")
    if aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        sys.exit("output projection is not tied to the token embeddings")
    with open(os.path.join(args.ct2_dir, "config.json"), encoding="utf-8") as f:
        ct2_config = json.load(f)

    dtype = np.float32 if args.dtype == "f32" else np.float16
    weights, n_enc, n_dec = convert_weights(variables, dtype)
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    n_mels = variables["encoder/conv1/weight"].shape[1]
    ffn = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    heads_enc = scalar(variables, "encoder/num_heads")
    heads_dec = scalar(variables, "decoder/num_heads")
    tokenizer, vocab = build_tokenizer(args.ct2_dir, vocab_size)
    ids = {t: i for i, t in enumerate(vocab)}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    no_ts = ids["<|notimestamps|>"]
    multilingual = vocab_size >= 51865

    os.makedirs(args.out_dir, exist_ok=True)
    save_file(weights, os.path.join(args.out_dir, "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": int(d_model),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "num_hidden_layers": n_enc,
        "encoder_attention_heads": heads_enc,
        "decoder_attention_heads": heads_dec,
        "encoder_ffn_dim": int(ffn),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "num_mel_bins": int(n_mels),
        "vocab_size": int(vocab_size),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "scale_embedding": bool(scalar(variables, "decoder/scale_embeddings")),
        "bos_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32" if args.dtype == "f32" else "float16",
    }
    # RECONSTRUCTED: everything below that CTranslate2's config.json does not carry.
    # suppress_tokens / begin_suppress_tokens / alignment_heads come from the package's
    # config.json (suppress_ids, suppress_ids_begin, alignment_heads); the special token
    # ids are looked up in its vocabulary; max_length and forced_decoder_ids are what
    # openai/whisper-tiny.en (.en: [[1, <|notimestamps|>]]) ships.
    generation = {
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "begin_suppress_tokens": ct2_config["suppress_ids_begin"],
        "suppress_tokens": ct2_config["suppress_ids"],
        "bos_token_id": sot,
        "decoder_start_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": config["max_target_positions"],
        "no_timestamps_token_id": no_ts,
        "prev_sot_token_id": ids["<|startofprev|>"],
        "return_timestamps": False,
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,
    }
    if multilingual:
        lang_ids = ct2_config.get("lang_ids", [])
        generation["lang_to_id"] = {vocab[i]: i for i in lang_ids}
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        generation["forced_decoder_ids"] = [[1, None], [2, ids["<|transcribe|>"]]]
    else:
        generation["forced_decoder_ids"] = [[1, no_ts]]
    preprocessor = {
        "chunk_length": 30,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": int(n_mels),
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        "processor_class": "WhisperProcessor",
    }
    for name, obj in (
        ("config.json", config),
        ("generation_config.json", generation),
        ("preprocessor_config.json", preprocessor),
        ("tokenizer_config.json", tokenizer_config),
        ("tokenizer.json", tokenizer),
    ):
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    print(f"wrote {args.out_dir}: {n_enc}+{n_dec} layers, d_model {d_model}, vocab {vocab_size}", file=sys.stderr)


if __name__ == "__main__":
    main()
