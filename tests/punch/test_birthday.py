"""Regression: a pair validated through a birthday slot keeps using that slot.

Found in the lab (symmetric <-> cone): the hard side's probe from extra socket k reached
the easy side (whose filter was open from an earlier random probe) and the answer came
back on slot k, but the path was recorded on slot 0, so the traffic left through
another NAT mapping and slot k was closed: the path died 6 s later.
"""

from __future__ import annotations

import random

from quictun.proto import stun
from quictun.punch import Candidate, PathConfig, PathManager

LOCAL_KEY, REMOTE_KEY = b"l" * 32, b"r" * 32
PEER = ("203.0.113.2", 4000)


def test_answer_on_a_slot_pins_the_path_to_that_slot() -> None:
    rng = random.Random(7)
    pm = PathManager(local_key=LOCAL_KEY, remote_key=REMOTE_KEY, local_networks=[],
                     random_bytes=rng.randbytes, multi_socket=True,
                     config=PathConfig(birthday_any_address=True))  # 203.0.113/24
    # our own NAT is symmetric (two reflectors saw two ports): we take the hard role
    pm.set_local_candidates([Candidate(("198.51.100.7", 1111), "srflx"),
                             Candidate(("198.51.100.7", 2222), "srflx")])
    pm.add_remote_candidates([Candidate(PEER, "srflx")], 0.0)
    pm.start(0.0)
    now, probe = 0.0, None
    while probe is None and now < 10.0:
        now += 0.05
        pm.handle_timer(now)
        for data, addr, _ttl, slot in pm.datagrams_to_send_slots(now):
            if slot > 0 and addr == PEER:
                probe = (data, slot)
                break
    assert probe is not None, "the hard side never probed from an extra socket"
    data, slot = probe
    txid = stun.decode(data).txid
    answer = stun.binding_success(txid, ("198.51.100.7", 40000 + slot), key=REMOTE_KEY)
    pm.receive_stun(answer, PEER, now + 0.01, slot=slot)
    cur = pm.current
    assert cur is not None and cur.kind == "direct" and cur.remote == PEER
    assert cur.slot == slot
    assert slot in pm.aux_slots()  # the socket stays open
    pm.datagrams_to_send_slots(now + 0.01)
    # heartbeats on the selected path leave from the same slot
    later = now + 5.0
    pm.handle_timer(later)
    sent = [s for _d, a, _t, s in pm.datagrams_to_send_slots(later) if a == PEER]
    assert sent and all(s == slot for s in sent)
