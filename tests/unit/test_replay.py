import pytest

from driftloop.replay import ScenarioError, parse_scenario, traffic
from tests.conftest import run_cli


def test_scenarios():
    assert parse_scenario("clean") == ("noise", 0)
    assert parse_scenario("corrupt:blur:4") == ("blur", 4)
    for bad, msg in [("noisy", "use 'clean' or"), ("corrupt:fog:3", "unknown corruption 'fog'"),
                     ("corrupt:noise:9", "severity must be 0..5"), ("corrupt:noise:x", "must be an integer")]:
        with pytest.raises(ScenarioError, match=msg):
            parse_scenario(bad)


def test_traffic_rows():
    df, feats, label = traffic("digits", "corrupt:noise:3", 50, seed=1)
    assert len(df) == 50 and len(feats) == 64 and label == "digit"
    df, feats, label = traffic("rainfall", "clean", 30)
    assert len(df) == 30 and df["day"].is_monotonic_increasing and label == "rain"
    with pytest.raises(ScenarioError, match="time-ordered"):
        traffic("rainfall", "corrupt:noise:1", 10)


def test_cli_replay_bad_scenario_is_one_line():
    r = run_cli("replay", "digits", "--scenario", "corrupt:fog:2", "--rows", "5")
    assert r.returncode == 2 and r.stderr.strip() == "error: scenario 'corrupt:fog:2': unknown corruption 'fog' (one of noise, blur, contrast, shift, dropout)"
