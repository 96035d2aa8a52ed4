import json
import re

from pristine.cli import main


def test_demo_trains_scores_and_writes_a_page_whose_images_exist(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-steps", "20", "--sample-steps", "10"]) == 0
    page = (out / "index.html").read_text()
    sources = re.findall(r"src=['\"]([^'\"]+)['\"]", page)
    assert len(sources) >= 3 and all((out / s).is_file() for s in sources)
    all_scores = json.loads((out / "scores.json").read_text())
    assert set(all_scores) == {"lora", "purecc"}
    for scores in all_scores.values():
        for key in ("fidelity", "fidelity_before", "adherence_background", "adherence_position",
                    "unrelated_pixel_distance", "unrelated_oracle_agreement"):
            assert 0.0 <= scores[key] <= 1.0, key
        assert scores["unrelated_pixel_distance"] > 0  # training changed the model at all
    for method in ("lora", "purecc"):
        assert (out / f"run_{method}" / "pytorch_lora_weights.safetensors").is_file()
    assert "purecc_concept.png" in page
    assert not list(out.glob("*.tmp*"))
