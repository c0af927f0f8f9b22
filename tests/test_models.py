"""Model loading: diffusers folders (the toy LDM among them), original single-file checkpoints, prompts, saving."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import regex
import torch
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from foba_core.capture import token_indices
from foba_core.models import encode_prompts, fast_tokenizer, load_pipeline, save_pipeline
from tiny_sd import (save_original_checkpoint, save_original_config, save_tiny_sd, tiny_pipeline,
                     tiny_tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SD folder on disk and the in-memory pipeline it was written from."""
    folder = tmp_path_factory.mktemp("models") / "tiny_sd"
    return folder, save_tiny_sd(folder, seed=0)


def unet_inputs(pipe, seed=1, size=8):
    """Latents (size x size, whatever the configured sample size), timesteps and token ids for the pipeline."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=gen)
    ids = pipe.tokenizer(["a photo of a bird", "a photo of a background"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return z, torch.tensor([10, 700]), ids


@torch.no_grad()
def outputs(pipe, seed=1):
    """U-Net noise prediction, VAE reconstruction and text states of one fixed input."""
    z, t, ids = unet_inputs(pipe, seed)
    hidden = pipe.text_encoder(ids)[0]
    eps = pipe.unet(z, t, hidden).sample
    image = torch.rand(1, 3, 2 * z.shape[-1], 2 * z.shape[-1], generator=torch.Generator().manual_seed(seed))
    recon = pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample
    return {"unet": eps, "vae": recon, "text_encoder": hidden}


def test_tiny_tokenizer_is_clip_like():
    tok = tiny_tokenizer(max_length=16)
    assert tok.tokenize("a photo of a bird") == ["a</w>", "photo</w>", "of</w>", "a</w>", "bird</w>"]
    pieces = tok.tokenize("xylophonist")
    assert len(pieces) > 1 and "".join(pieces) == "xylophonist</w>"
    assert tok.tokenize("A Photo") == ["a</w>", "photo</w>"]  # lower-cased like CLIP
    ids = tok("a bird").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.model_max_length == 16 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.tokenize("é") == ["Ã", "©</w>"]  # byte-level like CLIP: no unknown characters


def test_tiny_components_are_seeded():
    a, b, c = tiny_pipeline(seed=0), tiny_pipeline(seed=0), tiny_pipeline(seed=1)
    assert a.tokenizer.model_max_length == a.text_encoder.config.max_position_embeddings
    assert torch.equal(outputs(a)["unet"], outputs(b)["unet"])
    assert not torch.allclose(outputs(a)["unet"], outputs(c)["unet"])


def test_folder_round_trip(saved):
    folder, pipe = saved
    loaded = load_pipeline(folder)
    assert loaded.safety_checker is None and loaded.text_attention_mask is False
    assert loaded.foba_source == str(folder.resolve())
    assert loaded.tokenizer("a photo of a bird").input_ids == pipe.tokenizer("a photo of a bird").input_ids
    expected, got = outputs(pipe), outputs(loaded)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_folder_listing_a_safety_checker_it_lacks_still_loads(saved, tmp_path):
    folder, pipe = saved
    copy = tmp_path / "sd15_like"
    save_pipeline(pipe, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (copy / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(copy)
    assert loaded.safety_checker is None and loaded.feature_extractor is None


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_single_file_round_trip(saved, tmp_path, suffix):
    folder, pipe = saved
    file = save_original_checkpoint(pipe, tmp_path / f"model{suffix}")
    if suffix == ".ckpt":
        keys = torch.load(file, map_location="cpu", weights_only=True)["state_dict"].keys()
    else:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)  # the original CompVis layout, not diffusers'
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    loaded = load_pipeline(file, config=folder)
    assert loaded.foba_source == str(file.resolve()) and loaded.safety_checker is None
    expected, got = outputs(pipe), outputs(loaded)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0)


def test_single_file_with_original_yaml(saved, tmp_path):
    folder, pipe = saved
    file = save_original_checkpoint(pipe, tmp_path / "model.safetensors")
    yaml_file = save_original_config(pipe, tmp_path / "v1-inference.yaml")
    loaded = load_pipeline(file, config=folder, original_config=yaml_file)  # U-Net/VAE built from the yaml
    torch.testing.assert_close(outputs(loaded)["unet"], outputs(pipe)["unet"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="config=") as err:  # yaml alone needs CLIP configs from the hub cache
        load_pipeline(file, original_config=yaml_file)
    assert str(file) in str(err.value)


def test_single_file_hint_names_the_configs_option(tmp_path):
    import re

    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")  # refused before it is read: weights without configs
    with pytest.raises(ValueError, match="config=") as err:
        load_pipeline(file)
    option = re.search(r"CLI: --(\w+)", str(err.value)).group(1)
    root = Path(__file__).resolve().parent.parent
    texts = [p.read_text() for p in [*root.glob("bundles/*/configs/*.yaml"), *root.glob("configs/**/*.yaml")]]
    keys = {k for text in texts for k in re.findall(r"load_pipeline\([^)]*\bconfig=@(\w+)", text)}
    assert keys == {option} == {"pretrained_config"}  # the key the configs hand to load_pipeline(config=...)


def test_foba_json_of_a_folder_and_of_a_single_files_config(tmp_path):
    toy = tmp_path / "toy_ldm"
    save_tiny_sd(toy, seed=3, text_attention_mask=True)
    assert json.loads((toy / "foba.json").read_text())["text_attention_mask"] is True
    pipe = load_pipeline(toy)
    assert pipe.text_attention_mask is True and pipe.foba_source == str(toy.resolve())
    # a single file takes foba.json from its config folder
    assert load_pipeline(save_original_checkpoint(pipe, tmp_path / "toy.ckpt"), config=toy).text_attention_mask
    with pytest.raises(FileNotFoundError, match="not found: expected a local diffusers SD folder"):
        load_pipeline("toy")  # no preset: a name that is not a folder or file is an error


def test_the_shipped_toy_ldm_loads_from_its_folder():
    pipe = load_pipeline(os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_toy", "models", "toy_ldm"))
    assert pipe.text_attention_mask is True and pipe.unet.config.sample_size == 16


def test_bad_foba_json_names_the_file(saved, tmp_path):
    folder, pipe = saved
    save_pipeline(pipe, tmp_path / "m")
    (tmp_path / "m" / "foba.json").write_text('{"text_attention_mask": "yes"}')
    with pytest.raises(ValueError, match="foba.json"):
        load_pipeline(tmp_path / "m")


def test_encode_prompts_mask(saved):
    _, pipe = saved
    prompts = ["a photo of a bird", "a photo of a background now"]
    length = pipe.tokenizer.model_max_length
    pipe.text_attention_mask = False
    hidden, mask = encode_prompts(pipe, prompts)
    assert hidden.shape == (2, length, pipe.text_encoder.config.hidden_size) and mask is None
    pipe.text_attention_mask = True
    try:
        hidden_m, mask = encode_prompts(pipe, prompts)
    finally:
        pipe.text_attention_mask = False
    assert mask.dtype == torch.long and mask.shape == (2, length)
    # BOS and the words are visible; EOS and padding are hidden from cross-attention.
    assert mask.sum(1).tolist() == [1 + len(pipe.tokenizer.tokenize(p)) for p in prompts]
    assert mask[0, :6].all() and not mask[0, 6:].any()
    # the U-Net accepts the mask, and it changes the prediction
    z, t, _ = unet_inputs(pipe)
    with torch.no_grad():
        free = pipe.unet(z, t, hidden_m).sample
        masked = pipe.unet(z, t, hidden_m, encoder_attention_mask=mask).sample
    assert not torch.allclose(free, masked)
    with pytest.raises(TypeError, match="list of strings"):
        encode_prompts(pipe, "a photo of a bird")
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(pipe, [])


def test_save_pipeline_replaces_atomically(saved, tmp_path):
    _, pipe = saved
    target = tmp_path / "out"
    save_pipeline(pipe, target, extra={"note": "first"})
    save_pipeline(pipe, target, extra={"note": "second", "steps": 3})
    assert json.loads((target / "foba.json").read_text()) == {"text_attention_mask": False, "note": "second",
                                                              "steps": 3}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folders left behind
    assert torch.equal(load_pipeline(target).unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(TypeError):
        save_pipeline(pipe, tmp_path / "never", extra={"bad": object()})
    with pytest.raises(ValueError, match="text_attention_mask"):
        save_pipeline(pipe, tmp_path / "never", extra={"text_attention_mask": True})
    assert not (tmp_path / "never").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="precious"):  # never replaces a folder that is not a pipeline
        save_pipeline(pipe, precious)
    assert (precious / "notes.txt").read_text() == "keep"


def test_errors_name_the_path(saved, tmp_path):
    folder, pipe = saved
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nothing is downloaded") as err:
        load_pipeline(missing)
    assert str(missing) in str(err.value)

    broken = tmp_path / "broken"
    save_pipeline(pipe, broken)
    for part in ("unet", "tokenizer"):
        os.rename(broken / part, broken / f"{part}_gone")
    with pytest.raises(FileNotFoundError, match="missing unet, tokenizer") as err:
        load_pipeline(broken)
    assert str(broken) in str(err.value)

    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"'\.bin'") as err:
        load_pipeline(weights)
    assert str(weights) in str(err.value)

    file = save_original_checkpoint(pipe, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="config=") as err:
        load_pipeline(file)
    assert str(file) in str(err.value)
    with pytest.raises(FileNotFoundError, match="unet/config.json") as err:
        load_pipeline(file, config=broken)
    assert str(broken) in str(err.value)
    with pytest.raises(ValueError, match="single checkpoint files only"):
        load_pipeline(folder, config=folder)
    with pytest.raises(TypeError, match="torch_dtype"):
        load_pipeline(folder, torch_dtype="floaty")


def test_dtype_by_name(saved):
    folder, _ = saved
    pipe = load_pipeline(Path(folder), torch_dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_loaded_tiny_pipeline_generates(saved):
    folder, _ = saved
    pipe = load_pipeline(folder)
    size = 2 * pipe.unet.config.sample_size  # the VAE downsamples by 2
    image = pipe("a photo of a bird", num_inference_steps=2, guidance_scale=2.0, height=size, width=size,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, size, size) and torch.isfinite(image).all()
    assert 0 <= image.min() and image.max() <= 1


# CLIP's pre-tokenisation: special tokens, contractions, letter runs, single digits, other symbol runs.
CLIP_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
TOKENIZER_PROMPTS = ["a photo of a bird", "A Photo of a DOG, outdoors!", "xylophonist's 2 cars  é",
                     "a photo of a background with far too many words for sixteen tokens"]


class SlowCLIPTokenizer(transformers.PreTrainedTokenizer):
    """A pure-Python CLIP BPE tokenizer from vocab.json + merges.txt: slow, so it returns no character offsets."""

    vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt"}
    model_input_names = ["input_ids", "attention_mask"]
    add_bpe_version_header = True  # save_vocabulary writes merges.txt as CLIP's, with "#version: 0.2" first

    def __init__(self, vocab_file, merges_file, **kwargs):
        self.encoder = json.loads(Path(vocab_file).read_text())
        self.decoder = {i: t for t, i in self.encoder.items()}
        merges = Path(merges_file).read_text().splitlines()[1:]  # after the "#version" line
        self.bpe_ranks = {tuple(m.split()): rank for rank, m in enumerate(merges) if m}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.encoder)

    def get_vocab(self):
        return dict(self.encoder, **self.added_tokens_encoder)

    def _tokenize(self, text):
        to_bytes = ByteLevel(add_prefix_space=False, use_regex=False)
        tokens = []
        for word in CLIP_WORDS.findall(" ".join(text.lower().split())):
            parts = list(to_bytes.pre_tokenize_str(word)[0][0])
            parts[-1] += "</w>"
            while len(parts) > 1:  # apply the lowest-ranked merge present, leftmost first
                rank, i = min((self.bpe_ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if rank == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            tokens += parts
        return tokens

    def _convert_token_to_id(self, token):
        return self.encoder.get(token, self.encoder[self.unk_token])

    def _convert_id_to_token(self, index):
        return self.decoder[index]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return [self.bos_token_id, *token_ids_0, self.eos_token_id]


# transformers 4.x has the slow CLIPTokenizer itself; in 5.x CLIPTokenizer is the fast one and a stand-in is used.
SLOW_CLIP = (SlowCLIPTokenizer if issubclass(transformers.CLIPTokenizer, transformers.PreTrainedTokenizerFast)
             else transformers.CLIPTokenizer)


def as_sd14_release(folder: Path) -> Path:
    """Rewrite a saved folder's tokenizer as SD v1.4 ships it: slow CLIPTokenizer files, no tokenizer.json."""
    tokenizer = fast_tokenizer(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    tokenizer.backend_tokenizer.model.save(str(folder / "tokenizer"))  # vocab.json + merges.txt
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.model_max_length,
              "do_lower_case": True, "errors": "replace"}
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return folder


def assert_same_tokenizer(fast, slow):
    """The fast tokenizer is a drop-in for the slow one: same settings and ids, plus offsets."""
    assert fast.is_fast and not slow.is_fast
    assert (fast.model_max_length, fast.padding_side, fast.pad_token) == (slow.model_max_length, slow.padding_side,
                                                                           slow.pad_token)
    kwargs = {"padding": "max_length", "truncation": True, "max_length": slow.model_max_length}
    assert fast(TOKENIZER_PROMPTS, **kwargs).input_ids == slow(TOKENIZER_PROMPTS, **kwargs).input_ids
    assert token_indices(fast, "a photo of a bird", ["bird"]) == [[5]]  # BOS a photo of a bird


def test_sd14_release_folder_gets_the_fast_tokenizer(saved, tmp_path, monkeypatch):
    folder, pipe = saved
    sd14 = tmp_path / "sd14_like"
    save_pipeline(pipe, sd14)
    as_sd14_release(sd14)
    assert sorted(os.listdir(sd14 / "tokenizer")) == ["merges.txt", "special_tokens_map.json",
                                                      "tokenizer_config.json", "vocab.json"]
    # model_index.json names CLIPTokenizer: diffusers would load the slow class (transformers 4.x). Patched by
    # name: importing diffusers can leave a new ``transformers`` module object in sys.modules.
    monkeypatch.setattr("transformers.CLIPTokenizer", SLOW_CLIP)
    slow = SLOW_CLIP.from_pretrained(sd14 / "tokenizer")
    single_file = save_original_checkpoint(pipe, tmp_path / "model.ckpt")
    for loaded in (load_pipeline(sd14), load_pipeline(single_file, config=sd14)):
        assert_same_tokenizer(loaded.tokenizer, slow)
        assert fast_tokenizer(loaded.tokenizer) is loaded.tokenizer
        # registered, so that save_pipeline writes it and model_index.json names its class
        assert tuple(loaded.config.tokenizer) == ("transformers", type(loaded.tokenizer).__name__)
    assert_same_tokenizer(fast_tokenizer(slow), slow)  # a loaded slow tokenizer is converted from its own files


def test_tokenizer_folder_without_files_is_an_error(saved, tmp_path):
    _, pipe = saved
    empty = tmp_path / "no_tokenizer_files"
    save_pipeline(pipe, empty)
    for file in (empty / "tokenizer").iterdir():
        if file.name != "tokenizer_config.json":
            file.unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json") as err:
        load_pipeline(empty)
    assert str(empty / "tokenizer") in str(err.value)
