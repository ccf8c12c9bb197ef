"""Captioners (offline default, transformers VLMs on tiny random models) and the resumable caption store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmdiff.captioning import (
    PROMPT_COCO, PROMPT_DESCRIBE, PROMPT_INSPECT, Captioner, CaptionJob, CaptionMetadata, CaptionStore,
    OfflineCaptioner, TransformersCaptioner, create_captioner, load_display_captioner, register_captioner,
    run_captioning,
)
from vlmdiff.captioning.store import caption_into, shard_path
from vlmdiff.cli import main
from vlmdiff.data.demo import DemoConfig, make_demo_dataset, render_sample

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "image", "describe", "metal",
         "ring", "user", "assistant", ":"]


def test_published_prompts_verbatim() -> None:
    assert PROMPT_DESCRIBE.startswith("Describe the visual features of image in detail with a focus on the main")
    assert PROMPT_INSPECT.startswith("Be a pixel level visual defect inspector, and describe whether there is")
    assert PROMPT_COCO == ("Describe the visual features of image in detail, with around 60 words and maybe "
                           "4 or 5 sentences.")


# ---- offline captioner -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offline() -> OfflineCaptioner:
    captioner = create_captioner()  # the default
    assert isinstance(captioner, OfflineCaptioner) and isinstance(captioner, Captioner)
    return captioner


def _demo_image(class_name: str, index: int = 0) -> Image.Image:
    return Image.fromarray(render_sample(class_name, 0, "train", index, size=160).image)


def test_offline_captions_differ_by_class_and_repeat_exactly(offline: OfflineCaptioner) -> None:
    images = [_demo_image(name) for name in ("brick", "grass", "washer", "textile")]
    captions = offline.caption(images)
    assert len(set(captions)) == 4
    for caption in captions:
        assert 30 <= len(caption.split()) <= 60 and 4 <= caption.count(". ") + 1 <= 5
    assert "ring-shaped object" in captions[2] and "green" in captions[1]
    assert offline.caption([images[2]]) == [captions[2]]  # same image, alone or in a batch
    assert offline.caption(images[:2]) == captions[:2]


def test_offline_says_what_it_is(offline: OfflineCaptioner) -> None:
    metadata = CaptionMetadata.of(offline)
    assert metadata.captioner == "offline-efficientnet" and "efficientnet-lite0" in metadata.model_id
    assert create_captioner(prompt="pa").prompt == PROMPT_INSPECT


# ---- transformers VLMs, tiny and randomly initialised -------------------------------------------

def _tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)


def _favour(bias: torch.nn.Parameter, token: int) -> None:
    with torch.no_grad():
        bias.zero_()
        bias[token] = 100.0  # greedy decoding then always picks this word


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    tokenizer = _tokenizer(folder / "vocab")
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(
        vision_config=dict(layers, image_size=32, patch_size=8),
        text_config=dict(layers, vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                         pad_token_id=0, encoder_hidden_size=32),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    _favour(model.text_decoder.cls.predictions.decoder.bias, WORDS.index("metal"))
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    folder = tmp_path_factory.mktemp("llava")
    tokenizer = _tokenizer(folder / "vocab")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = LlavaConfig(
        vision_config=dict(layers, model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32),
        text_config=dict(layers, model_type="llama", vocab_size=len(tokenizer), num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(folder)
    return folder


FLORENCE_WORDS = ["a", "photo", "of", "metal", "ring"]


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        BartTokenizer, CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor,
    )

    folder = tmp_path_factory.mktemp("florence")
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *(f"\u0120{word}" for word in FLORENCE_WORDS)]  # \u0120: a space
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    text = dict(model_type="bart", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=256,
                vocab_size=len(tokenizer), bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                forced_eos_token_id=2)
    vision = dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                  embed_dim=[32], num_heads=[4], num_groups=[4], window_size=4, projection_dim=32,
                  max_position_embeddings=16)
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "<unk>", "<mask>", "<image>")]
    model.generation_config.suppress_tokens = special  # only words (and no end at once), so the random
    model.generation_config.begin_suppress_tokens = [tokenizer.eos_token_id]  # model says something
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                            image_seq_length=65)  # an 8 x 8 grid plus the pooled token
    Florence2Processor(image_processor, tokenizer).save_pretrained(folder)
    return folder


IMAGES = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (50, 50), (10, 200, 10))]


def test_encoder_decoder_vlm_captions_a_batch(tiny_blip: Path) -> None:
    captioner = create_captioner(str(tiny_blip), prompt="pd", max_new_tokens=3, device="cpu")
    assert isinstance(captioner, TransformersCaptioner) and captioner.text is None  # BLIP captions unprompted
    assert captioner.caption(IMAGES) == ["metal metal metal"] * 2
    assert CaptionMetadata.of(captioner).model_id == str(tiny_blip)


def test_chat_vlm_uses_template_and_strips_the_prompt(tiny_llava: Path) -> None:
    captioner = create_captioner(str(tiny_llava), prompt="pa", max_new_tokens=4, device="cpu", dtype="float32")
    assert captioner.text == f"user: <image>{PROMPT_INSPECT} assistant:"
    captions = captioner.caption(IMAGES)
    # Only the (random) answer comes back: the echoed prompt alone would decode to many more words.
    assert len(captions) == 2 and all(1 <= len(caption.split()) <= 4 for caption in captions)
    assert captioner.caption(IMAGES[:1]) == captions[:1]


def test_florence2_captions_with_its_task_token(tiny_florence: Path) -> None:
    captioner = create_captioner(str(tiny_florence), max_new_tokens=4, device="cpu")
    assert captioner.text == "<MORE_DETAILED_CAPTION>"  # the processor turns the task token into its prompt
    captions = captioner.caption(IMAGES)
    assert len(captions) == 2 and all(caption and set(caption.split()) <= set(FLORENCE_WORDS) for caption in captions)


def test_unknown_vlm_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot load VLM"):
        create_captioner(str(tmp_path / "no_such_model"))


# ---- the captioner the app shows ----------------------------------------------------------------

def test_display_captioner_is_the_chosen_vlm(tiny_blip: Path) -> None:
    captioner, note = load_display_captioner(str(tiny_blip), "test-counting", max_new_tokens=3, device="cpu")
    assert isinstance(captioner, TransformersCaptioner) and note is None
    assert captioner.caption(IMAGES[:1]) == ["metal metal metal"]


def _not_a_vlm(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    _tokenizer(folder).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=37)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, reason", [
    ("hub id", "We couldn't connect to 'https://huggingface.co'"),  # as on any machine without the network
    ("missing folder", "there is no folder"),
    ("not a VLM", "it is a bert model, not an image-text-to-text VLM"),
])
def test_display_captioner_falls_back_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                  reason: str) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    if kind == "hub id":
        wanted = "Salesforce/blip-image-captioning-base"
    else:
        wanted = str(tmp_path / "no_such_model" if kind == "missing folder" else _not_a_vlm(tmp_path / "bert"))
    captioner, note = load_display_captioner(wanted, "test-counting", device="cpu")
    assert isinstance(captioner, CountingCaptioner) and captioner.caption(IMAGES[:1]) == ["40 px wide"]
    assert note.startswith(f"The VLM {wanted!r} could not be loaded ({reason}") and "\n" not in note
    assert note.endswith("); this caption is from the model's own captioner, 'test-counting'.")


def test_display_captioner_without_a_choice_is_the_models_own() -> None:
    for wanted in (None, "", "test-counting"):
        captioner, note = load_display_captioner(wanted, "test-counting")
        assert isinstance(captioner, CountingCaptioner) and note is None


# ---- caption store ------------------------------------------------------------------------------

class CountingCaptioner:
    """A fake captioner that records how many images it was asked about."""

    name, model_id = "counting", "none"

    def __init__(self, prompt: str = PROMPT_DESCRIBE) -> None:
        self.prompt, self.calls = prompt, 0

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.calls += len(images)
        return [f"{image.size[0]} px wide" for image in images]


@register_captioner("test-counting")
def _counting(captioner_id, options) -> CountingCaptioner:
    return CountingCaptioner(options.prompt)


def _jobs(folder: Path, count: int) -> list[CaptionJob]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(count):
        Image.new("RGB", (10 + i, 8)).save(folder / f"{i}.png")
        jobs.append(CaptionJob(f"img/{i}.png", folder / f"{i}.png"))
    return jobs


def test_store_resumes_without_recaptioning(tmp_path: Path) -> None:
    jobs, out = _jobs(tmp_path / "img", 5), tmp_path / "captions.json"
    first = CountingCaptioner()
    store = CaptionStore.open(out, CaptionMetadata.of(first))
    assert caption_into(store, first, jobs[:3], batch_size=2, save_every=1, progress=False) == 3
    second = CountingCaptioner()
    resumed = run_captioning(second, jobs, out, batch_size=2)
    assert second.calls == 2 and len(resumed) == 5
    data = json.loads(out.read_text())
    assert data["captions"]["img/4.png"] == "14 px wide" and data["metadata"]["captioner"] == "counting"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.json", "img"]  # no temporary files left
    third = CountingCaptioner()
    run_captioning(third, jobs, out)
    assert third.calls == 0


def test_store_refuses_another_prompt_unless_overwrite(tmp_path: Path) -> None:
    jobs, out = _jobs(tmp_path / "img", 2), tmp_path / "captions.json"
    run_captioning(CountingCaptioner(), jobs, out)
    with pytest.raises(ValueError, match="another prompt"):
        run_captioning(CountingCaptioner(PROMPT_INSPECT), jobs, out)
    again = CountingCaptioner(PROMPT_INSPECT)
    run_captioning(again, jobs, out, overwrite=True)
    assert again.calls == 2 and CaptionStore.load(out).metadata.prompt == PROMPT_INSPECT


def test_leftover_shards_of_a_distributed_run_are_merged(tmp_path: Path) -> None:
    jobs, out = _jobs(tmp_path / "img", 3), tmp_path / "captions.json"
    captioner = CountingCaptioner()
    shard = CaptionStore(shard_path(out, 1), CaptionMetadata.of(captioner), {"img/1.png": "from shard"})
    shard.save()
    store = run_captioning(captioner, jobs, out)
    assert captioner.calls == 2 and store.captions["img/1.png"] == "from shard"
    assert not shard.path.exists()


def test_caption_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    make_demo_dataset(data, config=DemoConfig(n_train=3, n_test_good=1, n_defective=1, size=48,
                                              classes=("washer", "brick")))
    out = tmp_path / "captions.json"
    assert main(["caption", str(data), "--out", str(out), "--captioner", "test-counting", "--batch-size", "2"]) == 0
    captions = json.loads(out.read_text())["captions"]
    assert sorted(captions) == [f"{c}/train/good/{i:03d}.png" for c in ("brick", "washer") for i in range(3)]
    assert main(["caption", str(data), "--out", str(out), "--captioner", "test-counting", "--prompt", "pa"]) == 2
    assert "another prompt" in capsys.readouterr().err
