"""Loaders of the COCO / VQAv2 formats and collation through the model's processor."""

import json

import pytest
from PIL import Image

from ptpeft_kernels.train.builtin_model import BUILTIN_FAMILY, PRESETS, build_processor
from ptpeft_kernels.train.data import IGNORE_INDEX, Collator, caption_examples, load_captions, load_vqa


def _img(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


@pytest.fixture()
def coco(tmp_path):
    """A tiny COCO-like tree: Karpathy file, captions_val2014.json and a VQAv2 pair."""
    root = tmp_path / "coco"
    for sub, i in [("train2014", 1), ("train2014", 2), ("val2014", 3)]:
        _img(root / sub / f"COCO_{sub}_{i:012d}.jpg")
    karpathy = {
        "images": [
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_000000000001.jpg",
                "split": "train",
                "cocoid": 1,
                "sentences": [{"raw": "a red square ."}, {"raw": "red square"}],
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_000000000002.jpg",
                "split": "restval",
                "cocoid": 2,
                "sentences": [{"raw": "a blue circle ."}],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000000003.jpg",
                "split": "test",
                "cocoid": 3,
                "sentences": [{"raw": "a green triangle ."}, {"raw": "green triangle"}],
            },
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    caps = {
        "images": [{"id": 3, "file_name": "COCO_val2014_000000000003.jpg"}],
        "annotations": [{"image_id": 3, "id": 9, "caption": "a green triangle ."}],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(caps))
    qs = {
        "data_subtype": "train2014",
        "questions": [
            {"image_id": 1, "question": "what color is the square ?", "question_id": 10},
            {"image_id": 2, "question": "how many shapes are there ?", "question_id": 20},
        ],
    }
    anns = {
        "annotations": [
            {
                "question_id": 10,
                "image_id": 1,
                "multiple_choice_answer": "red",
                "answers": [{"answer": "red"}] * 10,
            },
            {
                "question_id": 20,
                "image_id": 2,
                "multiple_choice_answer": "1",
                "answers": [{"answer": "1"}] * 7 + [{"answer": "one"}] * 3,
            },
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    return tmp_path


def test_karpathy_splits(coco):
    train, missing = load_captions(coco / "dataset_coco.json", coco / "coco", "train")
    assert [r[2] for r in train] == [1, 2] and missing == []  # restval belongs to train
    test, _ = load_captions(coco / "dataset_coco.json", coco / "coco", "test")
    assert [(r[1], r[2]) for r in test] == [(["a green triangle .", "green triangle"], 3)]
    ex = caption_examples(train, "describe the image .", train=True)
    assert [e.target for e in ex] == ["a red square .", "red square", "a blue circle ."]
    ev = caption_examples(test, "p", train=False)
    assert len(ev) == 1 and ev[0].references == ("a green triangle .", "green triangle") and ev[0].key == 3


def test_coco_captions_file_finds_images_in_subtype_folder(coco):
    recs, _ = load_captions(coco / "captions_val2014.json", coco / "coco")
    assert recs[0][0].endswith("val2014/COCO_val2014_000000000003.jpg")
    recs, _ = load_captions(coco / "captions_val2014.json", coco / "coco" / "val2014")
    assert recs[0][1] == ["a green triangle ."]


def test_vqa_loader_and_pattern(coco):
    ex, missing = load_vqa(
        coco / "q.json", coco / "a.json", coco / "coco", prompt="question : {question} answer :"
    )
    assert [e.key for e in ex] == [10, 20] and missing == []
    assert ex[0].prompt == "question : what color is the square ? answer :" and ex[0].target == "red"
    assert ex[1].references.count("one") == 3
    pat = "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"
    ex2, _ = load_vqa(coco / "q.json", coco / "a.json", coco / "coco", prompt="{question}", image_pattern=pat)
    assert [e.image_path for e in ex2] == [e.image_path for e in ex]


def test_missing_image_names_file_and_record_or_is_skipped(coco):
    (coco / "coco" / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000002\.jpg") as e:
        load_captions(coco / "dataset_coco.json", coco / "coco", "train")
    assert "cocoid 2" in str(e.value) and "--skip-missing" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"question_id 20, image_id 2"):
        load_vqa(coco / "q.json", coco / "a.json", coco / "coco", prompt="{question}")
    recs, missing = load_captions(coco / "dataset_coco.json", coco / "coco", "train", skip_missing=True)
    assert [r[2] for r in recs] == [1] and len(missing) == 1 and "cocoid 2" in missing[0]
    ex, missing = load_vqa(
        coco / "q.json",
        coco / "a.json",
        coco / "coco",
        prompt="{q}".replace("q", "question"),
        skip_missing=True,
    )
    assert [e.key for e in ex] == [10] and len(missing) == 1


def test_malformed_json_names_file_and_key(coco):
    bad = coco / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"--captions: .*broken\.json is not valid JSON"):
        load_captions(bad, coco / "coco", "train")
    k = json.loads((coco / "dataset_coco.json").read_text())
    del k["images"][1]["filename"]
    (coco / "nokey.json").write_text(json.dumps(k))
    with pytest.raises(ValueError, match=r"nokey\.json: images\[1\] has no key 'filename'"):
        load_captions(coco / "nokey.json", coco / "coco", "train")
    (coco / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty\.json: the top level has no key 'images'"):
        load_captions(coco / "empty.json", coco / "coco")
    a = json.loads((coco / "a.json").read_text())
    del a["annotations"][0]["answers"]
    (coco / "a2.json").write_text(json.dumps(a))
    with pytest.raises(ValueError, match=r"a2\.json: the annotation of question_id 10 has no key 'answers'"):
        load_vqa(coco / "q.json", coco / "a2.json", coco / "coco", prompt="{question}")
    with pytest.raises(FileNotFoundError, match=r"--questions: file not found: .*nope\.json"):
        load_vqa(coco / "nope.json", coco / "a.json", coco / "coco", prompt="{question}")


def test_collator_labels_cover_exactly_the_target(coco):
    proc = build_processor(PRESETS["tiny"])
    ex, _ = load_vqa(coco / "q.json", coco / "a.json", coco / "coco", prompt=BUILTIN_FAMILY.vqa_prompt)
    col = Collator(proc, BUILTIN_FAMILY.template, proc.tokenizer.eos_token, "train")
    batch = col(ex)
    tok = proc.tokenizer
    n_image = (PRESETS["tiny"].image_size // PRESETS["tiny"].patch_size) ** 2
    for i, e in enumerate(ex):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == n_image
        target = labels[labels != IGNORE_INDEX]
        assert tok.decode(target) == f"{e.target} </s>"
        assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    gen = Collator(proc, BUILTIN_FAMILY.template, "</s>", "generate")(ex)
    assert gen["keys"] == [10, 20] and "labels" not in gen
    assert (gen["attention_mask"][:, -1] == 1).all()  # left padding for generation
