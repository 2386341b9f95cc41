from meshctl.core.logthrottle import LogThrottle, held_back


def test_first_event_logs_then_one_line_per_interval_with_the_count_held_back():
    t = LogThrottle(every=10.0)
    assert t.admit(("outbound", 65534), 0.0) == 0
    assert [t.admit(("outbound", 65534), 0.1 * i) for i in range(1, 50)] == [None] * 49
    assert t.admit(("outbound", 65534), 10.0) == 49  # the next line says how many were held back
    assert t.admit(("outbound", 65534), 12.0) is None
    assert t.admit(("outbound", 65534), 25.0) == 1
    assert t.admit(("outbound", 65534), 40.0) == 0  # a quiet interval: nothing was held back


def test_keys_are_throttled_apart_and_the_oldest_is_forgotten_past_the_cap():
    t = LogThrottle(every=10.0, max_keys=2)
    assert t.admit("a", 0.0) == 0 and t.admit("b", 0.0) == 0
    assert t.admit("a", 1.0) is None and t.admit("b", 1.0) is None
    assert t.admit("c", 2.0) == 0  # a third key: "a" is forgotten ...
    assert t.admit("a", 3.0) == 0  # ... so it logs again at once (never more than one line per new key)
    assert t.admit("c", 3.0) is None


def test_the_suffix_names_the_count_and_the_interval():
    assert held_back(0) == ""
    assert held_back(41) == " (and 41 more like it since the last line)"
