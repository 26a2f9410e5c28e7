"""benchmarks/ablate.py: variants, resumable results, table and plot (the training itself is replaced by a stub)."""

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablate  # noqa: E402


def test_a_study_runs_each_variant_once_and_continues_where_it_stopped(tmp_path, monkeypatch):
    calls = []

    def fake_train(**flags):  # a kNN curve that depends on the variant's mask ratio
        calls.append(flags)
        start = 30.0 + 10 * flags.get("mask_ratio", 0.75)
        return {"steps_per_epoch": 195, "step": 390, "final_dir": "f", "mixed_precision": "no", "knn_history": [{"step": s, "top1": start + s / 195} for s in (0, 195, 390)]}

    monkeypatch.setattr(ablate.train_extrema, "train", fake_train)
    common = ["--study", "masking", "--train_dir", "cifar", "--output_dir", str(tmp_path), "--num_train_epochs", "2"]
    ablate.main(common + ["--variants", "0.5 x 1"])
    assert len(calls) == 1
    flags = calls[0]
    assert flags["recipe"] == "tiny-cifar10" and flags["mask_ratio"] == 0.5 and flags["num_masks"] == 1
    assert flags["num_train_epochs"] == 2 and flags["knn_k"] == 20 and flags["train_dir"] == "cifar"

    results = ablate.main(common)  # the rest of the study; "0.5 x 1" is not run again
    assert len(calls) == len(ablate.STUDIES["masking"])
    assert [c["mask_ratio"] for c in calls].count(0.5) == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and list(saved["variants"]) == list(ablate.STUDIES["masking"])
    assert saved["variants"]["0.9 x 1"]["epochs"] == [0, 1, 2]
    assert saved["variants"]["0.9 x 1"]["knn_top1"] == pytest.approx([39.0, 40.0, 41.0])
    table = (tmp_path / "table.md").read_text()
    assert "| 0.9 x 1 | `mask_ratio=0.9`, `num_masks=1` | 39.00 → 40.00 → 41.00 | +2.00 |" in table
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_unknown_variants_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        ablate.parse_args(["--study", "fixes", "--output_dir", str(tmp_path), "--variants", "nope"])


def test_processes_sharing_a_study_folder_keep_each_others_variants(tmp_path, monkeypatch):
    """Another process records "0.9 x 1" while this one trains "0.5 x 1": results.json ends with both, in study order."""
    other = {"changes": {}, "epochs": [0, 1], "knn_top1": [30.0, 31.0], "wall_s": 1, "steps": 2, "steps_per_epoch": 2,
             "final_dir": "g", "mixed_precision": "no"}  # fmt: skip

    def fake_train(**flags):
        ablate.record_variant(tmp_path, "masking", "0.9 x 1", other, {"seed": 1})  # finishes meanwhile
        return {"steps_per_epoch": 2, "step": 2, "final_dir": "f", "mixed_precision": "no",
                "knn_history": [{"step": 0, "top1": 30.0}, {"step": 2, "top1": 33.0}]}  # fmt: skip

    monkeypatch.setattr(ablate.train_extrema, "train", fake_train)
    results = ablate.run_study("masking", tmp_path, ["0.5 x 1"], "cifar", seed=1)
    assert list(results["variants"]) == ["0.5 x 1", "0.9 x 1"]
    assert results["variants"]["0.9 x 1"] == other and results["variants"]["0.5 x 1"]["knn_top1"] == [30.0, 33.0]
    assert json.loads((tmp_path / "results.json").read_text()) == results


@pytest.mark.parametrize("study", sorted(ablate.STUDIES))
def test_every_variant_is_a_valid_change_to_the_recipe(study):
    """A misspelt flag or an out-of-range value would otherwise surface only when its run starts, hours into a study."""
    for name, changes in ablate.STUDIES[study].items():
        args = ablate.train_extrema.parse_args([], recipe="tiny-cifar10", train_dir="cifar", **changes)
        assert {flag: getattr(args, flag) for flag in changes} == changes, name
        ablate.train_extrema.build_config(args)  # and --config_overrides builds a valid config


def test_a_finished_run_is_recorded_beside_rows_the_study_no_longer_defines(tmp_path):
    """A results.json row whose variant was renamed since must not cost the run that just finished its record."""
    run = {"changes": {}, "epochs": [0, 1], "knn_top1": [30.0, 31.0], "wall_s": 1, "steps": 2, "steps_per_epoch": 2,
           "final_dir": "g", "mixed_precision": "no"}  # fmt: skip
    ablate.record_variant(tmp_path, "masking", "0.9 x 1", run, {"seed": 1})
    stale = json.loads((tmp_path / "results.json").read_text())
    stale["variants"] = {"an old name": run, **stale["variants"]}
    (tmp_path / "results.json").write_text(json.dumps(stale))
    results = ablate.record_variant(tmp_path, "masking", "0.5 x 1", run, {"seed": 1})
    assert list(results["variants"]) == ["0.5 x 1", "0.9 x 1", "an old name"]
