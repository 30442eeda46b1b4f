from driftloop.config import PolicySpec, RetrainSpec
from driftloop.drift.policy import Policy, submission_id
from driftloop.gate import decide


def spec(**kw):
    base = dict(policy=PolicySpec(k=2, m=3), cooldown_s=100, min_labelled_rows=0)
    base.update(kw)
    return RetrainSpec(**base)


def test_k_of_m_windows():
    p = Policy(spec())
    assert p.on_window(True, 0, 1) is None          # 1 of 1
    assert p.on_window(False, 1, 1) is None         # 1 of 2
    t = p.on_window(True, 2, 1)                     # 2 of 3
    assert t is not None and "drift in 2 of the last 3 windows" in t.reason and t.champion_version == 1


def test_old_windows_fall_out_of_m():
    p = Policy(spec())
    assert p.on_window(True, 0, 1) is None
    for i in range(3):
        assert p.on_window(False, i + 1, 1) is None
    assert p.on_window(True, 10, 1) is None         # the first drift is now outside the last 3


def test_cooldown_blocks_then_allows():
    p = Policy(spec(policy=PolicySpec(k=1, m=1)))
    assert p.on_window(True, 0, 1) is not None
    assert p.on_window(True, 50, 1) is None
    assert p.on_window(True, 101, 1) is not None


def test_windows_flagged_during_a_cooldown_count_at_the_first_window_after_it():
    """A cooldown delays a drift trigger but keeps the k-of-m memory: no later flagged window is needed."""
    p = Policy(spec())  # k=2 of m=3, cooldown 100 s
    assert p.on_window(True, 0, 1) is None and p.on_window(True, 1, 1) is not None  # fired at t=1
    assert p.on_window(True, 50, 1) is None and p.on_window(True, 60, 1) is None      # flagged, cooling down
    t = p.on_window(False, 102, 1)                                                    # a clean window after it
    assert t is not None and t.reason == "drift in 2 of the last 3 windows (k=2)"
    p.retrained(103, swapped=True)  # the swap clears what the old champion's windows said
    assert p.state.recent == [] and p.on_window(True, 300, 2) is None


def test_min_labelled_rows_defers_the_trigger():
    p = Policy(spec(policy=PolicySpec(k=1, m=1), min_labelled_rows=100))
    assert p.on_window(True, 0, 1) is None
    assert p.state.pending
    assert p.on_labels(60, None, 1, 1) is None
    t = p.on_labels(40, None, 2, 1)
    assert t is not None and "after 100 labelled rows" in t.reason and p.state.pending is None


def test_accuracy_floor_online_alarm_new_labels_and_manual():
    p = Policy(spec(policy=PolicySpec(accuracy_floor=0.8)))
    assert p.on_labels(1, 0.9, 0, 1) is None
    assert "below floor" in p.on_labels(1, 0.7, 1, 1).reason
    p = Policy(spec())
    assert "online detector cvm raised" in p.on_online_alarm("cvm", 0, 1).reason
    p = Policy(spec(policy=PolicySpec(online_alarm=False)))
    assert p.on_online_alarm("cvm", 0, 1) is None
    p = Policy(spec(policy=PolicySpec(new_labels=10)))
    assert p.on_labels(9, None, 0, 1) is None
    assert "10 new labelled rows" in p.on_labels(1, None, 1, 1).reason
    p = Policy(spec(min_labelled_rows=10**6))
    assert p.on_window(True, 0, 1) is None
    assert p.manual(0, 1).reason == "manual trigger"  # manual ignores cooldown and label minimum


def test_submission_id_is_deterministic():
    assert submission_id("digits", 3, 0) == submission_id("digits", 3, 0) == "driftloop-retrain-digits-v3-g0"
    assert submission_id("digits", 3, 1) != submission_id("digits", 3, 0)
    assert submission_id("digits", 3, 0, attempt=2).endswith("-r2")


def test_promotion_gate():
    assert decide(0.9, None, 0.01).promote
    assert decide(0.92, 0.9, 0.01).promote
    assert not decide(0.905, 0.9, 0.01).promote
    assert not decide(0.9, 0.9, 0.0).promote          # a tie does not replace the champion
    assert decide(0.91, 0.9, 0.0).promote
    refused = decide(0.5, 0.9, 0.0)
    assert not refused.promote and "0.5000 vs 0.9000" in refused.reason
    assert not decide(float("nan"), 0.9, 0.0).promote
    tie = decide(0.9, 0.9, 0.0, tie_promotes=True)             # a challenger with the current regime's reference
    assert tie.promote and "ties" in tie.reason
    assert not decide(0.89, 0.9, 0.0, tie_promotes=True).promote
    # regression is gated on an error: lower wins, and the margin is in the label's units
    assert decide(40.0, 45.0, 2.0, metric="rmse").promote
    worse = decide(46.0, 45.0, 0.0, metric="rmse")
    assert not worse.promote and "lower is better" in worse.reason and "-1.0000" in worse.reason
    assert not decide(44.0, 45.0, 2.0, metric="mae").promote


def test_a_trigger_released_by_labels_keeps_the_drift_event_that_caused_it():
    p = Policy(spec(policy=PolicySpec(k=1, m=1), min_labelled_rows=100))
    assert p.on_window(True, 0, 1, event_id="ev-drift") is None      # deferred: too few labels
    assert p.on_window(False, 1, 1, event_id="ev-clean") is None     # a later, clean window releases nothing
    t = p.on_labels(100, None, 2, 1)
    assert t is not None and t.event_id == "ev-drift" and t.cause == "drift event ev-drift"
    assert Policy(spec()).manual(0, 1).cause == "manual"
    floor = Policy(spec(policy=PolicySpec(accuracy_floor=0.8))).on_labels(1, 0.5, 0, 1)
    assert floor.cause == "accuracy floor" and floor.event_id is None
    assert Policy(spec(policy=PolicySpec(new_labels=1))).on_labels(1, None, 0, 1).cause == "labels"


def test_after_a_swap_the_new_detectors_warm_up_and_the_cooldown_counts_from_the_swap():
    p = Policy(spec(policy=PolicySpec(k=1, m=1, warmup_windows=3), cooldown_s=100))
    assert p.on_window(True, 0, 1) is not None
    p.retrained(now=500, swapped=True)                     # the challenger took over at t=500
    assert p.on_window(True, 550, 2) is None               # cooling down from the swap (not from the trigger at 0)
    assert p.on_window(True, 620, 2) is None               # cooled down, but the new detectors have seen 2 of 3 windows
    t = p.on_window(True, 630, 2)
    assert t is not None and t.champion_version == 2
    assert p.snapshot()["windows_since_swap"] == 3


def test_online_alarms_wait_for_the_warm_up_too():
    p = Policy(spec(policy=PolicySpec(k=1, m=2), cooldown_s=0))
    p.retrained(now=0, swapped=True)
    assert p.on_online_alarm("cvm", 1, 2) is None
    p.on_window(False, 2, 2)
    p.on_window(False, 3, 2)
    assert p.on_online_alarm("cvm", 4, 2, event_id="ev1").cause == "drift event ev1"


def test_new_data_trigger_needs_its_minimum_and_names_the_version():
    from driftloop.config import NewDataSpec

    p = Policy(spec(policy=PolicySpec(new_data=NewDataSpec(min_rows=500)), cooldown_s=0))
    assert p.on_new_data(499, 3, 0, 1) is None
    t = p.on_new_data(500, 4, 1, 1)
    assert t is not None and t.cause == "data version 4"
    assert Policy(spec()).on_new_data(10**6, 4, 0, 1) is None    # not configured: never


def test_each_refused_challenger_doubles_the_cooldown_until_a_swap():
    p = Policy(spec(policy=PolicySpec(k=1, m=1), cooldown_s=100))
    assert p.on_window(True, 0, 1) is not None
    p.retrained(now=10)                                    # refused: the drift did not hurt this champion
    assert p.on_window(True, 150, 1) is None               # cooldown is now 200 s from the trigger at 0
    assert p.on_window(True, 201, 1) is not None
    p.retrained(now=210)
    assert p.snapshot()["cooldown_s"] == 400
    p.retrained(now=300, swapped=True)
    assert p.snapshot()["cooldown_s"] == 100 and p.state.refusals == 0


def test_a_label_counts_in_the_period_its_time_on_record_falls_in_as_a_restart_counts_it():
    """A restarted monitor counts labels from the feedback table: those recorded after the last retraining (and
    after the last trigger). A live monitor counts a label once its commit is acknowledged; a label recorded just
    before a retraining finished and acknowledged just after must not count toward the next one, or a restart
    changes the count (seen in the two-node test: 125 labels live, 117 after the restore)."""
    p = Policy(spec(min_labelled_rows=100))
    assert p.on_window(True, 1.0, 1) is None and p.on_window(True, 2.0, 1) is None  # pending: too few labels
    p.retrained(10.0, swapped=True)
    stamped = [9.5, 10.5, 11.0]  # the first was recorded before the retraining finished
    assert p.on_labels(len(stamped), None, 11.2, 2, stamped=stamped) is None
    st = p.state  # what a restart counts from the table (serving/monitor_state.py): the same
    assert p.state.labelled == sum(t > st.labelled_since for t in stamped) == 2
    assert p.state.labels_since_trigger == sum(t > (st.last_trigger_at or st.labelled_since) for t in stamped) == 2
    p.on_labels(1, None, 12.0, 2)  # without times on record (the backtest): every label counts
    assert p.state.labelled == 3
