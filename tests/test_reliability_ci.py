"""The reliability campaign's CI subset (bench/reliability, docs/reliability.md): the `ci` profile —
one seeded trial per case family on the cheapest jobs and files, 30 flag invocations, 8 app
clients — run once against the working tree; every trial of every category must pass.

The full campaign is run by hand: python -m bench.reliability --n 20 --out /tmp/rel (see the doc).
"""

import pytest

CATEGORIES = ("kill", "corrupt", "enospc", "flags", "app")
BUDGET_S = 3 * 3600  # a safety net only: on a loaded machine the subset must finish, never be cut short


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    from bench.reliability.cli import run_campaign

    out = tmp_path_factory.mktemp("reliability")
    quiet = dict(seed=0, time_budget=BUDGET_S, profile="ci", freeze=False, log=lambda *_: None)
    results = run_campaign(out, n=1, only=[c for c in CATEGORIES if c != "flags"], **quiet)
    results.update(run_campaign(out, n=2, only=["flags"], **quiet))  # 30 invocations
    return out, results


@pytest.mark.slow
@pytest.mark.parametrize("category", CATEGORIES)
def test_category_has_no_failures(campaign, category):
    out, results = campaign
    counts = results[category]
    report = (out / f"{category}.md").read_text()
    assert counts["passed"] > 0, report
    assert counts["failed"] == 0 and counts["blocked"] == 0, report
