"""The text-to-image digits pipelines: tokenizer, prompt attributes, the shipped folders, and the training script."""

import json
import math

import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

from zoo import PIPELINES, VAE
from zoo.attributes import (
    ATTRIBUTES,
    DIGIT_WORDS,
    adherence,
    bins,
    evaluation_prompts,
    make_prompt,
    measure,
    parse_prompt,
    prompt_index,
    training_prompts,
)
from zoo.data import load_digits16
from zoo.folders import folder_bytes, write_folder
from zoo.pipelines import call_kwargs, generate, load_pipeline
from zoo.text2img import train_pipeline
from zoo.tokenizer import MAX_LENGTH, build_tokenizer
from zoo.vae import train_vae

CLASSES = {"sd-digits": StableDiffusionPipeline, "pixart-digits": PixArtAlphaPipeline}


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(PIPELINES["sd-digits"] / "tokenizer")


def read_prompts(which: str) -> list[str]:
    return (PIPELINES[which] / "prompts.txt").read_text().splitlines()


@pytest.mark.parametrize("which", list(PIPELINES))
def test_every_evaluation_prompt_is_whole_words_within_16_tokens(tokenizer, which):
    prompts = read_prompts(which)
    assert prompts == evaluation_prompts() and len(prompts) == 40
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert len(ids) <= MAX_LENGTH
        assert tokens[0] == tokenizer.bos_token and tokens[-1] == tokenizer.eos_token
        assert tokenizer.eos_token_id not in ids[1:-1]  # no unknown (EOS is CLIP's unk) inside
        words = prompt.replace("-", " - ").split()
        assert [t.removesuffix("</w>") for t in tokens[1:-1]] == words  # each word is one token


def test_unknown_words_fall_back_to_characters(tokenizer):
    prompt = "a wobbly 7 with serifs! (quite bold) ~zz"
    ids = tokenizer(prompt).input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.split() == ["a", "wobbly", "7", "with", "serifs", "!", "(", "quite", "bold", ")", "~", "zz"]
    assert len(tokenizer("xq").input_ids) == 4  # <sot> x q</w> <eot>


def test_shipped_tokenizer_is_the_generated_one(tokenizer):
    built = build_tokenizer()
    assert built.get_vocab() == tokenizer.get_vocab() and tokenizer.model_max_length == MAX_LENGTH
    prompts = [*training_prompts(), "zebra 42"]
    assert built(prompts).input_ids == tokenizer(prompts).input_ids


def test_parse_prompt_round_trips_every_training_prompt():
    prompts = training_prompts()
    assert len(set(prompts)) == len(prompts) == 10 * 4 * 4 + 1
    for prompt in prompts:
        digit, attributes = parse_prompt(prompt)
        assert make_prompt(digit, attributes) == prompt
    assert parse_prompt("a thick right-slanted seven") == (7, {"thickness": "thick", "slant": "right"})
    assert parse_prompt("An UPRIGHT 8") == (8, {"slant": "upright"})
    assert parse_prompt("") == (None, {})


def test_prompt_index_picks_the_training_prompt_of_the_measured_words():
    prompts = training_prompts()
    for d, t, s in [(0, 0, 0), (7, 3, 2), (9, 1, 3), (4, 2, 0)]:
        index = prompt_index(torch.tensor([d]), torch.tensor([t]), torch.tensor([s]))
        named = {"thickness": ATTRIBUTES["thickness"][t - 1]} if t else {}
        named |= {"slant": ATTRIBUTES["slant"][s - 1]} if s else {}
        assert parse_prompt(prompts[int(index)]) == (d, named)
    assert prompts[-1] == ""


def canvas() -> torch.Tensor:
    return torch.full((1, 1, 16, 16), -1.0)


def test_measure_orders_thick_and_thin_strokes():
    thin, thick = canvas(), canvas()
    thin[..., 3:13, 7:8] = 1
    thick[..., 3:13, 6:9] = 1
    values = measure(torch.cat([thin, thick]))["thickness"]
    assert values[1] > 2 * values[0] > 0


def test_measure_orders_left_and_right_slants():
    left, upright, right = canvas(), canvas(), canvas()
    for row in range(2, 14):
        upright[..., row, 7] = 1
        right[..., row, 7 + (8 - row) // 2] = 1  # top is to the right: "/"
        left[..., row, 7 - (8 - row) // 2] = 1  # "\"
    slant = measure(torch.cat([left, upright, right]))["slant"]
    assert slant[0] < -0.2 and abs(slant[1]) < 1e-6 and slant[2] > 0.2


def test_adherence_of_real_digits_to_their_own_measured_prompts():
    images, labels = load_digits16()
    images, labels = images[::9], labels[::9]
    measured = bins(measure(images), labels)
    words = {a: [ATTRIBUTES[a][int(i)] for i in v] for a, v in measured.items()}
    prompts = [make_prompt(int(d), {a: words[a][i] for a in ATTRIBUTES}) for i, d in enumerate(labels)]
    report = adherence(images, prompts)
    assert report["digit"]["rate"] >= 0.95 and report["digit"]["count"] == len(images)
    assert report["thickness"]["rate"] == report["slant"]["rate"] == 1.0
    # the opposite words never match
    flipped = [
        make_prompt(int(d), {a: ATTRIBUTES[a][2 - int(measured[a][i])] for a in ATTRIBUTES})
        for i, d in enumerate(labels)
    ]
    middle = {a: int((measured[a] == 1).sum()) for a in ATTRIBUTES}
    report = adherence(images, flipped)
    for a in ATTRIBUTES:
        assert report[a]["rate"] == pytest.approx(middle[a] / len(images))
    assert adherence(images[:3], ["", "", ""])["thickness"] == {"rate": None, "count": 0}


@pytest.mark.parametrize("which", list(PIPELINES))
def test_shipped_pipeline_loads_and_draws_finite_16x16_images(which):
    pipe = CLASSES[which].from_pretrained(PIPELINES[which])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a thick seven", "an upright eight"],
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **call_kwargs(pipe),
    ).images
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert pipe.vae.config.scaling_factor != 0.18215 and pipe.tokenizer.model_max_length == MAX_LENGTH
    assert folder_bytes(PIPELINES[which]) < 6 * 2**20


@pytest.mark.parametrize("which", list(PIPELINES))
def test_shipped_training_record_meets_the_bar(which):
    record = json.loads((PIPELINES[which] / "training.json").read_text())
    assert record["training"]["command"].startswith(f"python -m zoo train {which}")
    assert record["training"]["steps"] >= 1000 and record["training"]["seconds"] > 0
    guided = record["evaluation"][f"guidance_{record['sampling']['guidance_scale']:g}"]
    assert guided["digit"]["rate"] >= 0.85
    for attribute in ATTRIBUTES:
        assert guided[attribute]["rate"] > 0.45 and guided[attribute]["count"] > 0


def test_shipped_vae_reconstructs_digits():
    record = json.loads((VAE / "training.json").read_text())["evaluation"]
    assert record["psnr_db_mean"] > 30
    assert record["classifier_accuracy_reconstructed"] >= record["classifier_accuracy_real"] - 0.02
    vae = AutoencoderKL.from_pretrained(VAE)
    images, _ = load_digits16()
    with torch.no_grad():
        z = vae.encode(images[:256]).latent_dist.mean * vae.config.scaling_factor
    assert z.shape == (256, 4, 8, 8) and 0.7 < float(z.std()) < 1.3


def test_tiny_training_runs_write_loadable_folders(tmp_path):
    vae = train_vae(tmp_path / "vae", steps=2, batch_size=8)
    assert math.isfinite(vae["latents"]["scaling_factor"]) and (tmp_path / "vae" / "training.json").exists()
    record = train_pipeline("pixart-digits", tmp_path / "pixart", tmp_path / "vae", steps=2, batch_size=8, seed=3)
    assert record["training"]["steps"] == 2 and record["training"]["seed"] == 3
    pipe = load_pipeline(tmp_path / "pixart")
    assert isinstance(pipe, PixArtAlphaPipeline)
    images, prompts = generate(pipe, ["a nine", ""], seeds=[0], steps=2, guidance=2.0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all() and prompts == ["a nine", ""]
    assert (tmp_path / "pixart" / "prompts.txt").read_text().splitlines() == evaluation_prompts()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_write_folder_leaves_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "model"
    write_folder(out, lambda tmp: (tmp / "a.txt").write_text("old"))

    def broken(tmp):
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder(out, broken)
    assert (out / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]
    write_folder(out, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["b.txt"]


def test_digit_words_cover_the_classes():
    assert len(DIGIT_WORDS) == 10 and all(parse_prompt(make_prompt(d))[0] == d for d in range(10))
