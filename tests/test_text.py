"""Text conditioning: embeddings files, umT5 through transformers (tiny random config), the tiny encoder, nodes."""
import io
import os
import subprocess
import sys

import pytest
import torch

from twinflow.core.errors import CheckpointError
from twinflow.models import text as T

PROMPTS = ["a cat walks on the beach at sunset", "the quick brown fox jumps over the lazy dog",
           "video of a red car driving in the rain", "ein Hund läuft im Park", "un chat noir dort sur le canapé"]


# ---------------------------------------------------------------------------------------------- embeddings files


def test_load_text_embeddings_node(tf_dirs):
    from safetensors.torch import save_file

    from twinflow.nodes.text import TwinFlowLoadTextEmbeddings

    folder = tf_dirs["models"] / "text_embeddings"
    folder.mkdir()
    e2 = torch.randn(7, 16)
    T.save_text_embeddings(e2, folder / "a.safetensors")
    save_file({"whatever": torch.randn(2, 5, 16)}, str(folder / "b.safetensors"))
    save_file({"x": torch.randn(3, 16), "y": torch.randn(3, 16)}, str(folder / "two.safetensors"))
    save_file({"embeddings": torch.randn(2, 2, 3, 16)}, str(folder / "4d.safetensors"))
    save_file({"embeddings": torch.ones(3, 16, dtype=torch.int32)}, str(folder / "int.safetensors"))
    names = TwinFlowLoadTextEmbeddings.INPUT_TYPES()["required"]["embeddings_name"][0]
    assert names == ["4d.safetensors", "a.safetensors", "b.safetensors", "int.safetensors", "two.safetensors"]
    node = TwinFlowLoadTextEmbeddings()
    (cond,) = node.load("a.safetensors", "auto", 16)
    assert len(cond) == 1 and cond[0][1] == {} and torch.equal(cond[0][0], e2[None])
    (cond,) = node.load("b.safetensors", "auto", 0)
    assert cond[0][0].shape == (2, 5, 16)
    (cond,) = node.load("two.safetensors", "y", 0)
    assert cond[0][0].shape == (1, 3, 16)
    with pytest.raises(CheckpointError, match="cannot tell which tensor"):
        node.load("two.safetensors", "auto", 0)
    with pytest.raises(CheckpointError, match="no tensor named 'z'"):
        node.load("two.safetensors", "z", 0)
    with pytest.raises(ValueError, match=r"shape \[L, D\] or \[B, L, D\]"):
        node.load("4d.safetensors", "auto", 0)
    with pytest.raises(ValueError, match="floating point"):
        node.load("int.safetensors", "auto", 0)
    with pytest.raises(ValueError, match="does not match the expected 4096"):
        node.load("a.safetensors", "auto", 4096)
    with pytest.raises(FileNotFoundError):
        node.load("nope.safetensors", "auto", 0)


# ---------------------------------------------------------------------------------------------- tiny encoder


def test_tiny_encoder_deterministic_across_processes():
    emb = T.tiny_text_encode("A red car, driving in the rain!", width=64)
    code = ("import torch, sys; from twinflow.models.text import tiny_text_encode; "
            "e = tiny_text_encode('A red car, driving in the rain!', width=64); "
            "sys.stdout.buffer.write(e.numpy().tobytes())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True, timeout=120).stdout
    other = torch.frombuffer(bytearray(out), dtype=torch.float32).reshape(emb.shape)
    assert torch.equal(emb, other)


def test_tiny_encoder_structure():
    toks = T.tiny_tokenize("A cat, a CAT.")
    assert toks == ["a", "cat", ",", "a", "cat", ".", "</s>"]
    e = T.tiny_text_encode("A cat, a CAT.", width=32)
    assert e.shape == (1, 7, 32) and e.dtype == torch.float32
    # the same word at two positions differs exactly by the position code (0.1 * sin-cos)
    half = torch.arange(16, dtype=torch.float64)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * half / 16)

    def code(p):
        return torch.cat([torch.sin(p * freqs), torch.cos(p * freqs)]).float()

    torch.testing.assert_close(e[0, 1] - 0.1 * code(1), e[0, 4] - 0.1 * code(4), rtol=0, atol=1e-6)
    assert not torch.allclose(e[0, 0], e[0, 1])
    padded = T.tiny_text_encode("A cat, a CAT.", width=32, pad_to=12)
    assert padded.shape == (1, 12, 32) and torch.equal(padded[:, :7], e) and not padded[:, 7:].any()
    assert T.tiny_text_encode("", width=8).shape == (1, 1, 8)
    assert not torch.equal(T.tiny_text_encode("a dog", width=8), T.tiny_text_encode("a cat", width=8))
    with pytest.raises(ValueError, match="even number"):
        T.tiny_text_encode("x", width=7)


def test_tiny_node():
    from twinflow.nodes.text import TwinFlowTinyTextEncode

    spec = TwinFlowTinyTextEncode.INPUT_TYPES()["required"]
    assert spec["width"][1]["default"] == 4096
    (cond,) = TwinFlowTinyTextEncode().encode("hello world", 4096, 0)
    assert cond[0][0].shape == (1, 3, 4096) and cond[0][1] == {}


# ---------------------------------------------------------------------------------------------- umT5


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("models") / "text_encoders" / "umt5-tiny"
    folder.mkdir(parents=True)
    proto = io.BytesIO()
    # T5's special ids: pad 0, </s> 1, unk 2, no bos
    spm.SentencePieceTrainer.train(sentence_iterator=iter(PROMPTS * 20), model_writer=proto, vocab_size=48,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False)
    (folder / "spiece.model").write_bytes(proto.getvalue())
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    transformers.UMT5EncoderModel(cfg).eval().save_pretrained(str(folder))
    return folder


def test_umt5_matches_transformers_on_real_tokens(umt5_folder):
    import sentencepiece as spm
    import transformers

    enc = T.UMT5TextEncoder(umt5_folder)
    sp = spm.SentencePieceProcessor(model_file=str(umt5_folder / "spiece.model"))
    ref_model = transformers.UMT5EncoderModel.from_pretrained(str(umt5_folder), local_files_only=True).eval()
    texts = ["a cat walks on the beach", "the lazy   dog &amp; a red car driving in the rain at sunset"]
    out = enc.encode(texts, pad_to=64)
    assert out.shape == (2, 64, 32) and out.dtype == torch.float32
    for i, text in enumerate(texts):
        ids = sp.encode(T.clean_prompt(text)) + [1]  # sentencepiece ids + </s>
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # unpadded run: no mask needed
        n = len(ids)
        torch.testing.assert_close(out[i, :n], ref, rtol=1e-5, atol=1e-5)
        assert not out[i, n:].any()  # zero beyond the real tokens, as Wan/ComfyUI
    longest = enc.encode(texts, pad_to=0)
    assert longest.shape[1] == max(len(sp.encode(T.clean_prompt(t))) + 1 for t in texts)
    trunc = enc.encode([texts[1]], max_length=5, pad_to=0)
    assert trunc.shape == (1, 5, 32)


def test_umt5_node(umt5_folder):
    from twinflow.core import paths
    from twinflow.nodes.text import TwinFlowUMT5TextEncode

    paths.set_models_dir(umt5_folder.parent.parent)
    try:
        assert TwinFlowUMT5TextEncode.INPUT_TYPES()["required"]["encoder"][0] == ["umt5-tiny"]
        (cond,) = TwinFlowUMT5TextEncode().encode("umt5-tiny", "a red car", "default", 512, 512)
        (again,) = TwinFlowUMT5TextEncode().encode("umt5-tiny", "a red car", "default", 512, 512)
    finally:
        paths.set_models_dir(None)
    assert cond[0][0].shape == (1, 512, 32) and cond[0][1] == {}
    assert torch.equal(cond[0][0], again[0][0])


def test_umt5_bad_folder(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing weights"):
        T.UMT5TextEncoder(tmp_path)


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match="pip install transformers sentencepiece"):
        T.UMT5TextEncoder(tmp_path)
