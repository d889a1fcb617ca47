"""The synthetic generator: deterministic, in the real formats, within the tokenizer's vocabulary."""

import json

from ptpeft_kernels.train import synthetic


def _write(root, seed=0):
    return synthetic.write_dataset(root, "downstream", {"train": 6, "val": 3}, seed=seed, image_size=32)


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = _write(tmp_path / "a"), _write(tmp_path / "b"), _write(tmp_path / "c", seed=5)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert len(files) > 9
    for rel in files:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    assert a.karpathy.read_bytes() != c.karpathy.read_bytes()


def test_formats_and_vocabulary(tmp_path):
    d = _write(tmp_path)
    vocab = set(synthetic.vocabulary())
    k = json.loads(d.karpathy.read_text())
    assert {img["split"] for img in k["images"]} == {"train", "val"}
    for img in k["images"]:
        assert (d.image_dir / img["filepath"] / img["filename"]).is_file()
        assert len(img["sentences"]) == 5
        for s in img["sentences"]:
            assert set(s["raw"].split()) <= vocab, s["raw"]
    caps = json.loads(d.splits["val"].captions.read_text())
    assert {a["image_id"] for a in caps["annotations"]} == {i["id"] for i in caps["images"]}
    qs = json.loads(d.splits["train"].questions.read_text())
    anns = json.loads(d.splits["train"].annotations.read_text())
    assert qs["data_subtype"] == "train2014"
    assert [q["question_id"] for q in qs["questions"]] == [a["question_id"] for a in anns["annotations"]]
    for q, a in zip(qs["questions"], anns["annotations"], strict=True):
        assert set(q["question"].split()) <= vocab
        assert len(a["answers"]) == 10
        assert a["multiple_choice_answer"] in {x["answer"] for x in a["answers"]} | {"0", "1", "2", "3", "4"}
        assert set(a["multiple_choice_answer"].split()) <= vocab


def test_distributions_differ():
    import random

    pre = synthetic.captions(
        synthetic.sample_scene(random.Random(1), "pretrain"), "pretrain", random.Random(1)
    )
    down = synthetic.captions(
        synthetic.sample_scene(random.Random(1), "downstream"), "downstream", random.Random(1)
    )
    assert not any(":" in c for c in pre)
    assert all(" : " in c and "shape" in c for c in down)
