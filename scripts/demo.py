"""Three real p2pd daemons on 127.0.0.1: handles claimed, resolved across nodes, an
encrypted message delivered and answered, then everything stopped.

Run it with scripts/demo. Every step prints the CLI command it runs and what came back.
"""

from __future__ import annotations

import shutil
import sys

from p2pd.testing.daemons import DaemonProcess, cli_json, run_cli, short_tempdir

HANDLES = ("alice", "bob", "carol")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    root = short_tempdir("p2pd-demo-")
    daemons: list[DaemonProcess] = []
    try:
        step(f"three identities in temporary homes under {root}")
        for handle in HANDLES:
            proc = run_cli(root / handle, "init", handle, "--no-passphrase")
            print(f"$ p2pd --home {root / handle} init {handle} --no-passphrase")
            print(proc.stdout.strip() or proc.stderr.strip())
            if proc.returncode:
                return 1

        step("alice starts a new network; bob and carol join through her")
        first = DaemonProcess(root / "alice").wait_ready()
        daemons.append(first)
        print(f"alice's daemon listens on {first.listen}")
        for handle in HANDLES[1:]:
            d = DaemonProcess(root / handle, bootstrap=[first.listen]).wait_ready()
            daemons.append(d)
            print(f"{handle}'s daemon listens on {d.listen}, bootstrapped from {first.listen}")

        step("every node resolves every handle through the DHT")
        failures = 0
        for asker in HANDLES:
            for target in HANDLES:
                if asker == target:
                    continue
                record = cli_json(root / asker, "whois", target)
                owner = next(d for d in daemons if d.handle.startswith(target + "#"))
                ok = record["fingerprint"] == owner.fingerprint
                failures += not ok
                print(
                    f"{asker:>5} -> whois {target:<5} {record['self_certifying']:<20} "
                    f"at {', '.join(record['addresses'])}  "
                    f"{'key matches' if ok else 'KEY MISMATCH'}"
                )

        step("a self-certifying lookup with a wrong fingerprint prefix is refused")
        proc = run_cli(root / "bob", "whois", "alice#aaaaaaaaaaaa")
        print(f"$ p2pd whois alice#aaaaaaaaaaaa  -> exit {proc.returncode}: {proc.stderr.strip()}")
        failures += proc.returncode != 1

        step("alice sends bob an end-to-end encrypted message (X3DH, then the Double Ratchet)")
        text = "hi bob, only you can read this"
        proc = run_cli(root / "alice", "send", "bob", text, "--wait", "--timeout", "30")
        print(f'$ p2pd send bob "{text}" --wait\n{(proc.stdout or proc.stderr).strip()}')
        failures += proc.returncode != 0
        proc = run_cli(root / "bob", "inbox")
        print(f"$ p2pd inbox   (on bob's daemon)\n{proc.stdout.strip()}")
        failures += text not in proc.stdout

        step("bob answers; the ack travels back and alice sees it arrive")
        reply = "hello alice, received"
        proc = run_cli(root / "bob", "send", "alice", reply, "--wait", "--timeout", "30")
        print(f'$ p2pd send alice "{reply}" --wait\n{(proc.stdout or proc.stderr).strip()}')
        failures += proc.returncode != 0
        proc = run_cli(root / "alice", "inbox", "--from", "bob")
        print(f"$ p2pd inbox --from bob   (on alice's daemon)\n{proc.stdout.strip()}")
        failures += reply not in proc.stdout
        proc = run_cli(root / "alice", "contacts")
        print(f"$ p2pd contacts   (bob's key is pinned on first contact)\n{proc.stdout.strip()}")

        step("bob's status")
        print(run_cli(root / "bob", "status").stdout.strip())
    finally:
        step("stopping the daemons")
        for d in daemons:
            code = d.stop()
            print(f"{d.handle}: exit {code}")
        shutil.rmtree(root, ignore_errors=True)
    print("\ndemo " + ("succeeded" if failures == 0 else f"FAILED ({failures} checks)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
