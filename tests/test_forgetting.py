"""launcher/forgetting.py: ACC, BWT, FWT (GEM 2017) and forgetting (Chaudhry et al. 2018) on matrices
small enough to check by hand, and the files write_report leaves in the run dir."""

import json

import pytest
from pytest import approx

from launcher.forgetting import JSON_FILE, PNG_FILE, forgetting_report, render_table, write_report

# Three tasks learned one per phase (learned_at[j] = j). Task a improves after it is learned (0.5 -> 0.8)
# before dropping, so its forgetting (from its best) differs from its backward transfer (from when learned).
TOY_R = [[0.5, 0.3, 0.2],   # after phase 0 (trains a)
         [0.8, 0.9, 0.4],   # after phase 1 (trains b)
         [0.6, 0.6, 0.9]]   # after phase 2 (trains c)
TOY_BASELINE = [0.1, 0.2, 0.3]


def toy(**kwargs):
    return forgetting_report(["a", "b", "c"], ["p0", "p1", "p2"], TOY_R, [0, 1, 2], **kwargs)


def test_toy_by_hand():
    rep = toy(baseline=TOY_BASELINE)
    # ACC = (0.6 + 0.6 + 0.9) / 3 = 0.7
    assert rep.acc == approx(0.7)
    # BWT over a, b: ((0.6 - 0.5) + (0.6 - 0.9)) / 2 = (0.1 - 0.3) / 2 = -0.1
    assert rep.bwt == approx(-0.1)
    # FWT over b, c: ((R[0][b] - 0.2) + (R[1][c] - 0.3)) / 2 = (0.1 + 0.1) / 2 = 0.1
    assert rep.fwt == approx(0.1)
    # forgetting a = max(0.5, 0.8) - 0.6 = 0.2; b = 0.9 - 0.6 = 0.3; c is learned last: none. Average 0.25
    assert rep.forgetting == approx({"a": 0.2, "b": 0.3})
    assert rep.avg_forgetting == approx(0.25)
    assert toy().fwt is None  # no baseline, no forward transfer


def test_gem_special_case():
    # P = T = 4, learned_at[j] = j: GEM's formulas verbatim (1-indexed, R_{i,j} = R[i-1][j-1]).
    R = [[0.70, 0.20, 0.25, 0.10], [0.60, 0.80, 0.30, 0.15], [0.55, 0.75, 0.90, 0.35], [0.50, 0.72, 0.85, 0.95]]
    b = [0.05, 0.10, 0.20, 0.15]
    T = 4
    gem_acc = sum(R[T - 1][i - 1] for i in range(1, T + 1)) / T
    gem_bwt = sum(R[T - 1][i - 1] - R[i - 1][i - 1] for i in range(1, T)) / (T - 1)
    gem_fwt = sum(R[i - 2][i - 1] - b[i - 1] for i in range(2, T + 1)) / (T - 1)
    rep = forgetting_report(list("abcd"), ["p0", "p1", "p2", "p3"], R, [0, 1, 2, 3], b)
    assert (rep.acc, rep.bwt, rep.fwt) == (approx(gem_acc), approx(gem_bwt), approx(gem_fwt))
    # Here every task is best right after it is learned, so forgetting is minus each task's backward transfer.
    assert rep.forgetting == approx({"a": 0.2, "b": 0.08, "c": 0.05})
    assert rep.avg_forgetting == approx(-gem_bwt)


def test_loss_sign_convention():
    # Losses: a is learned at phase 0 (1.0) and gets worse (1.4); b drops from 3.5 to 3.0 before it is trained.
    rep = forgetting_report(["a", "b"], ["p0", "p1"], [[1.0, 3.0], [1.4, 0.8]], [0, 1], [3.0, 3.5],
                            metric="loss", higher_is_better=False)
    assert rep.acc == approx((1.4 + 0.8) / 2)       # plain mean loss, not flipped
    assert rep.bwt == approx(-0.4)                  # a got worse: negative
    assert rep.fwt == approx(0.5)                   # b got better before training: positive
    assert rep.forgetting == approx({"a": 0.4})     # a got worse: positive
    # Negating a loss and calling it higher-is-better gives the same transfer numbers.
    neg = forgetting_report(["a", "b"], ["p0", "p1"], [[-1.0, -3.0], [-1.4, -0.8]], [0, 1], [-3.0, -3.5])
    assert (neg.bwt, neg.fwt, neg.forgetting) == (approx(rep.bwt), approx(rep.fwt), approx(rep.forgetting))
    # The toy with the lower-is-better flag: every difference changes sign, ACC does not.
    flipped = toy(baseline=TOY_BASELINE, higher_is_better=False)
    assert (flipped.acc, flipped.bwt, flipped.fwt) == (approx(0.7), approx(0.1), approx(-0.1))
    assert flipped.forgetting == approx({"a": 0.6 - 0.5, "b": 0.6 - 0.9})  # final minus the lowest seen


def test_task_never_trained_is_evaluated_but_not_counted():
    R = [[0.8, 0.1, 0.30], [0.6, 0.9, 0.35]]
    rep = forgetting_report(["a", "b", "held_out"], ["p0", "p1"], R, [0, 1, None], [0.1, 0.1, 0.3])
    assert rep.acc == approx((0.6 + 0.9) / 2)
    assert rep.bwt == approx(0.6 - 0.8)
    assert rep.fwt == approx(0.1 - 0.1)
    assert rep.forgetting == approx({"a": 0.2})
    assert "held_out" in render_table(rep)
    nothing = forgetting_report(["a"], ["p0", "p1"], [[0.5], [0.6]], [None], [0.4])
    assert (nothing.acc, nothing.bwt, nothing.fwt, nothing.forgetting, nothing.avg_forgetting) == (
        None, None, None, {}, None)


def test_more_tasks_than_phases():
    # 2 phases, 3 tasks: phase 0 trains a and b together, phase 1 trains c.
    R = [[0.7, 0.8, 0.3], [0.5, 0.8, 0.9]]
    rep = forgetting_report(["a", "b", "c"], ["p0", "p1"], R, [0, 0, 1], [0.2, 0.2, 0.25])
    assert rep.acc == approx((0.5 + 0.8 + 0.9) / 3)
    assert rep.bwt == approx(((0.5 - 0.7) + (0.8 - 0.8)) / 2)   # -0.1
    assert rep.fwt == approx(0.3 - 0.25)                        # only c is learned after phase 0
    assert rep.forgetting == approx({"a": 0.2, "b": 0.0})
    assert rep.avg_forgetting == approx(0.1)


def test_single_phase_has_only_acc():
    rep = forgetting_report(["a", "b"], ["only"], [[0.4, 0.6]], [0, 0], [0.1, 0.1])
    assert rep.acc == approx(0.5)
    assert (rep.bwt, rep.fwt, rep.forgetting, rep.avg_forgetting) == (None, None, {}, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(R=[[0.1, 0.2], [0.3]]), r"R\[1\] \(phase 'p1'\) has 1 values"),
    (dict(R=[[0.1, 0.2]]), "R has 1 rows but there are 2 phases"),
    (dict(learned_at=[0]), "learned_at has 1 entries for 2 tasks"),
    (dict(learned_at=[0, 2]), r"learned_at\[1\] \(task 'b'\) is 2"),
    (dict(baseline=[0.1]), "baseline has 1 values for 2 tasks"),
    (dict(tasks=["a", "a"]), "task names must be unique"),
    (dict(R=[[0.1, float("nan")], [0.3, 0.4]]), "non-finite"),
    (dict(R=[[0.1, "x"], [0.3, 0.4]]), r"R\[0\] must be a list of numbers"),
    (dict(tasks=[], R=[[], []], learned_at=[]), "at least one phase and one task"),
])
def test_bad_input_is_refused(kwargs, message):
    args = dict(tasks=["a", "b"], phases=["p0", "p1"], R=[[0.1, 0.2], [0.3, 0.4]], learned_at=[0, 1]) | kwargs
    with pytest.raises(ValueError, match=message):
        forgetting_report(**args)


def test_render_table():
    text = render_table(toy(baseline=TOY_BASELINE))
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "a", "b", "c"]
    assert lines[1].split() == ["(baseline)", "0.1000", "0.2000", "0.3000"]
    assert lines[3].split() == ["p1", "0.8000", "0.9000*", "0.4000"]  # * marks where b is learned
    assert len({len(line) for line in lines[:5]}) == 1                  # fixed width
    assert "ACC 0.7000  BWT -0.1000  FWT 0.1000  avg forgetting 0.2500" in text
    assert "FWT -" in render_table(toy())


def test_write_report_round_trip(tmp_path):
    rep = toy(baseline=TOY_BASELINE)
    written = write_report(tmp_path, rep)
    data = json.loads((tmp_path / JSON_FILE).read_text())
    assert data == rep.to_dict()
    assert set(data["definitions"]) >= {"acc", "bwt", "fwt", "forgetting", "avg_forgetting"}
    assert "GEM" in data["definitions"]["bwt"] and "Chaudhry" in data["definitions"]["forgetting"]
    inputs = ("tasks", "phases", "R", "learned_at", "baseline", "metric", "higher_is_better")
    assert forgetting_report(**{k: data[k] for k in inputs}) == rep
    try:
        import matplotlib  # noqa: F401  (optional dependency)
    except ImportError:
        assert written == [tmp_path / JSON_FILE]
    else:
        assert written == [tmp_path / JSON_FILE, tmp_path / PNG_FILE]
        assert (tmp_path / PNG_FILE).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temp left
