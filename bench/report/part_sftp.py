"""Part 6: the SSH transport's SFTP push against `scp` of the same file to the same sshd."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncssh

from rbee_control.inventory.loader import load_inventory
from rbee_control.ssh import remote as ssh_remote
from rbee_control.ssh.known_hosts import KnownHosts
from rbee_control.ssh.remote import SshTransport
from tests import sshd

from .common import (
    REPO,
    Context,
    Row,
    Section,
    at_least,
    children_cpu,
    log,
    make_fleet,
    med,
    plt_module,
    save_figure,
    self_cpu,
    spread,
    ssh_version,
    sshd_cpu,
    table,
)


async def sftp_put(node: Any, known_hosts: Path, source: Path, target: str) -> dict[str, float | str]:
    cpu0, t0 = self_cpu(), time.perf_counter()
    transport = SshTransport(node, known_hosts=KnownHosts(known_hosts))
    try:
        await transport.connect()
        t1 = time.perf_counter()
        await transport.put(source, target, resume=False)
        t2 = time.perf_counter()
        conn = await transport.connection()
        cipher = str(conn.get_extra_info("send_cipher"))
    finally:
        await transport.close()
    return {"wall": time.perf_counter() - t0, "put": t2 - t1, "cpu": self_cpu() - cpu0, "cipher": cipher}


GCM = "aes128-gcm@openssh.com"


async def put_with_cipher(
    node: sshd.SshdNode, source: Path, target: str, cipher: str
) -> dict[str, float | str]:
    """Diagnostic: the transport's own upload loop over an asyncssh connection with another cipher."""
    cpu0, t0 = self_cpu(), time.perf_counter()
    async with asyncssh.connect(
        node.host, node.port, username=node.user, client_keys=[str(node.client_key)],
        known_hosts=([node.host_key], [], []), config=None, encryption_algs=[cipher],
    ) as conn:  # fmt: skip
        async with conn.start_sftp_client() as sftp:
            await ssh_remote._upload(sftp, source, target, source.stat().st_size, 0, None)
        got = str(conn.get_extra_info("send_cipher"))
    return {"wall": time.perf_counter() - t0, "cpu": self_cpu() - cpu0, "cipher": got}


def scp_argv(node: sshd.SshdNode, known_hosts: Path, source: Path, target: str, *extra: str) -> list[str]:
    return [
        "scp", "-q", *extra, "-i", str(node.client_key), "-P", str(node.port),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        str(source), f"{node.user}@{node.host}:{target}",
    ]  # fmt: skip


def part_sftp(ctx: Context) -> Section:
    section = Section("sftp", "6. SFTP push vs `scp` (256 MiB over loopback, same sshd)")
    node = ctx.sshd.get("127.0.0.2")
    base = ctx.tmp / "sftp"
    fleet = make_fleet(base, {"n2": node}, local=False)
    known_hosts = fleet.keeper.config_dir / "known_hosts"
    inventory_node = load_inventory(fleet.inventory).node("n2")
    size = 256 * 1024 * 1024
    source = base / "payload.bin"
    with source.open("wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))  # incompressible
    dest = base / "dest"
    dest.mkdir()
    probe = subprocess.run(
        [*scp_argv(node, known_hosts, REPO / "README.md", str(dest / "probe"), "-v")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    scp_cipher = next(
        (
            line.split("cipher:")[1].split()[0]
            for line in probe.stderr.splitlines()
            if "client->server cipher" in line
        ),
        "?",
    )
    reps = ctx.reps(5, 2)
    sides = ("sftp put", "scp", "scp -O", f"put, {GCM.split('@')[0]}")
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    server_cpu: dict[str, list[float]] = {s: [] for s in sides}
    put_only: list[float] = []
    cipher = "?"
    for rep in range(reps):
        order = list(sides[rep % len(sides) :] + sides[: rep % len(sides)])
        for side in order:
            target = dest / f"{side.replace(' ', '_')}.bin"
            server0 = sshd_cpu([node])
            if side == "sftp put":
                got = asyncio.run(
                    asyncio.wait_for(sftp_put(inventory_node, known_hosts, source, str(target)), 300)
                )
                wall[side].append(float(got["wall"]))
                cpu[side].append(float(got["cpu"]))
                put_only.append(float(got["put"]))
                cipher = str(got["cipher"])
            elif side.startswith("put, "):
                got = asyncio.run(asyncio.wait_for(put_with_cipher(node, source, str(target), GCM), 300))
                if got["cipher"] != GCM:
                    raise RuntimeError(f"asked for {GCM}, got {got['cipher']}")
                wall[side].append(float(got["wall"]))
                cpu[side].append(float(got["cpu"]))
            else:
                extra = ("-O",) if side == "scp -O" else ()
                cpu0, t0 = children_cpu(), time.perf_counter()
                subprocess.run(
                    scp_argv(node, known_hosts, source, str(target), *extra),
                    check=True, capture_output=True, timeout=300,
                )  # fmt: skip
                wall[side].append(time.perf_counter() - t0)
                cpu[side].append(children_cpu() - cpu0)
            if target.stat().st_size != size:
                raise RuntimeError(f"{side}: {target.stat().st_size} bytes arrived, not {size}")
            target.unlink()
            time.sleep(0.3)  # let the connection's sshd processes exit and be reaped
            server_cpu[side].append(sshd_cpu([node]) - server0)
        log(f"sftp: repetition {rep + 1}/{reps} done")
    source.unlink()
    mb = size / 1e6
    rate = {s: med([mb / w for w in wall[s]]) for s in sides}
    ratio = med([s / p for s, p in zip(wall["scp"], wall["sftp put"], strict=True)])  # = put MB/s / scp MB/s
    section.rows.append(
        Row(
            "SFTP `put` (connect included) vs `scp`",
            f"{rate['sftp put']:.0f} vs {rate['scp']:.0f} MB/s",
            f"{ratio:.2f}×",
            "≥ 0.8× scp",
            at_least(ratio, 0.8),
        )
    )
    ratio_o = med([a / b for a, b in zip(wall["scp -O"], wall["sftp put"], strict=True)])
    section.rows.append(
        Row(
            "SFTP `put` vs `scp -O` (legacy SCP protocol)",
            f"{rate['sftp put']:.0f} vs {rate['scp -O']:.0f} MB/s",
            f"{ratio_o:.2f}×",
            "— (reference)",
        )
    )
    gcm = sides[3]
    ratio_gcm = med([s / p for s, p in zip(wall["scp"], wall[gcm], strict=True)])
    section.rows.append(
        Row(
            f"diagnostic: the same upload loop with `{GCM}` instead of chacha20-poly1305, vs `scp`",
            f"{rate[gcm]:.0f} vs {rate['scp']:.0f} MB/s",
            f"{ratio_gcm:.2f}×",
            "— (diagnostic)",
        )
    )
    section.body.append(
        f"A {size >> 20} MiB file of random bytes, pushed {reps} times per side (order rotated) to the "
        "same sshd on 127.0.0.2, read from and written to the same local disk. *sftp put* is "
        "`SshTransport.put` (what `models add file:` and a cold `infer` use; 255 KiB writes, 16 in "
        f"flight), its connect included; `scp` is {ssh_version()}'s scp, which speaks SFTP by default; "
        "`scp -O` uses the old SCP protocol. *client CPU* is this process's CPU time during the put "
        "(asyncssh runs in it) or the scp client's; *server CPU* is the sshd side (its connection "
        "process and `sftp-server`). *put, aes128-gcm* is a diagnostic, not what rbee does: the "
        "transport's own upload loop (`rbee_control.ssh.remote._upload`) over an asyncssh connection "
        f"that negotiates `{GCM}`. Default ciphers: asyncssh "
        f"`{cipher}`, OpenSSH `{scp_cipher}`."
    )
    rows = [
        [s, f"{rate[s]:.0f}", f"{med(wall[s]):.2f}", f"{med(cpu[s]):.2f}", f"{med(server_cpu[s]):.2f}",
         spread(wall[s], 2)]
        for s in sides
    ]  # fmt: skip
    put_rate = med([mb / p for p in put_only])
    rows.append(
        ["sftp put, transfer only", f"{put_rate:.0f}", f"{med(put_only):.2f}", "", "", spread(put_only, 2)]
    )
    section.body.append(
        table(
            ["side", "MB/s", "wall s", "client CPU s", "server CPU s", "wall per repetition"],
            rows,
        )
    )
    ctx_rates = {**rate, "sftp put (transfer only)": med([mb / p for p in put_only])}
    plt = plt_module()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    labels = list(ctx_rates)
    ax.barh(labels, [ctx_rates[k] for k in labels], color=["C0", "C1", "C2", "C3", "C0"])
    ax.axvline(0.8 * rate["scp"], color="red", linestyle=":", label="target: 0.8 × scp")
    ax.set_xlabel("MB/s (higher is better)")
    ax.set_title(f"push of {size >> 20} MiB to an sshd on loopback")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    save_figure(ctx, fig, "bench-sftp.png", section)
    return section
