"""librdkafka's mock cluster in a process of its own: ``python -m tests.sources.kafka_mock``.

The mock lives inside the client that creates it (``test.mock.num.brokers``), so this
process owns one and keeps it up; consumers in other processes reach its brokers over
loopback TCP like a real cluster. It prints ``bootstrap HOST:PORT[,...]`` once the brokers
answer, and exits when its stdin closes (the fixture closes it, or dies).
"""

from __future__ import annotations

import sys

from confluent_kafka import Producer


def main() -> None:
    brokers = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    owner = Producer({"test.mock.num.brokers": brokers, "log_level": 3})
    md = owner.list_topics(timeout=30)
    hosts = ",".join(f"{b.host}:{b.port}" for b in sorted(md.brokers.values(), key=lambda b: b.id))
    print(f"bootstrap {hosts}", flush=True)
    sys.stdin.read()  # until the fixture closes the pipe
    del owner


if __name__ == "__main__":
    main()
