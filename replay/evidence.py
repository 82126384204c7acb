"""``castgate evidence``: a PCI DSS evidence bundle that checks itself.

One directory per request:

    index.html                          summary an assessor reads in a browser
    keys/signing_ed25519.pub.pem        the relay's public signing key
    sessions/ID/audit-record.json       the session's audit record, each field mapped to
                                        PCI DSS v4.0.1 requirement numbers
    sessions/ID/NAME.cast               the recording with its .chain and .manifest.json
    sessions/ID/replay.html             the recording in a self-contained web player
    run-record.json                     (``--run``) the pipeline run: who started it, each
                                        session, command, approval, masking and
                                        credential use on one timeline
    SHA256SUMS                          for `sha256sum -c` without castgate
    evidence-manifest.json              SHA-256 of every other file, signed with the
                                        relay's Ed25519 key

``castgate verify DIR`` checks every file against the manifest (naming any that was
changed, removed or added), the manifest's signature, and every cast's hash chain and
signed manifest. Seek indexes (``*.cast.idx``) that a player writes next to a cast are
derived caches, never trusted, and ignored.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recorder.config import Config
from recorder.errors import CastgateError
from recorder.integrity import (
    Report,
    Verdict,
    chain_path,
    file_sha256,
    manifest_path,
    verify_cast,
)
from recorder.objectstore import locate_cast
from recorder.signing import (
    PUBLIC_NAME,
    SigningKey,
    SigningKeyError,
    key_id,
    load_public,
    public_from_raw_b64,
    public_pem,
    public_raw_b64,
    verify_signature,
)
from recorder.store import Store
from replay.export import export_html
from replay.seekindex import INDEX_SUFFIX

BUNDLE_MANIFEST = "evidence-manifest.json"
BUNDLE_FORMAT = "castgate-evidence/1"
RECORD_FORMAT = "castgate-audit-record/1"
RUN_FORMAT = "castgate-run-record/1"
RUN_RECORD = "run-record.json"
SUMS = "SHA256SUMS"

# What each PCI DSS v4.0.1 requirement cited in an audit record asks (paraphrased
# from shared/PCI_DSS.md; the PCI SSC text is the authority).
REQUIREMENTS: dict[str, str] = {
    "3.3.1": "Sensitive authentication data (full track data) is not kept after authorization.",
    "3.4.1": "PAN is masked when displayed: at most the BIN and the last four digits shown.",
    "3.5.1": "PAN is unreadable wherever stored, audit logs and recordings included.",
    "6.5.1": "Changes follow a documented approval by authorized parties, with a reason.",
    "7.2.1": "Access is granted by job function and least privilege.",
    "7.2.2": "Access is assigned by job classification and function, privileged users included.",
    "7.2.5": "System and application accounts get least privilege.",
    "8.2.1": "Every user has a unique ID before any access.",
    "8.6.1": "A system or application account used interactively is used by exception, "
    "time-limited, and every action is attributable to an individual.",
    "8.6.2": "No passwords or passphrases hard-coded in scripts, configuration or source.",
    "10.2.1": "Audit logs are enabled and active for all system components.",
    "10.2.1.1": "Audit logs capture every individual access to cardholder data.",
    "10.2.1.2": "Audit logs capture every action by anyone with administrative access.",
    "10.2.1.3": "Audit logs capture every access to audit logs.",
    "10.2.1.4": "Audit logs capture invalid logical access attempts.",
    "10.2.2": "Each audit record holds user, event type, date and time, success or failure, "
    "origination, and the affected component or resource.",
    "10.3.2": "Audit log files are protected from modification.",
    "10.3.4": "File integrity monitoring or change detection is used on audit logs.",
}

# field of the audit record -> (requirements, what the field shows)
FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "identity": (("8.2.1", "10.2.2"), "unique identity the session ran as (10.2.2: user)"),
    "groups": (("7.2.1", "7.2.2"), "groups of the identity at session time"),
    "auth_method": (("8.2.1", "10.2.2"), "how the identity proved itself"),
    "oidc": (
        ("8.2.1", "8.6.1", "10.2.2"),
        "the OIDC provider, subject and pipeline run of the token (who triggered the run)",
    ),
    "credentials_used": (
        ("8.6.2", "7.2.5"),
        "the relay's own target credentials used for the session (names and fingerprints, "
        "never values): the agent held none",
    ),
    "source_address": (("10.2.2",), "where the session came from (10.2.2: origination)"),
    "target": (("10.2.2", "7.2.1"), "system the session reached (10.2.2: affected component)"),
    "protocol": (("10.2.2",), "protocol of the session (10.2.2: type of event)"),
    "started_at": (("10.2.2",), "start, UTC (10.2.2: date and time)"),
    "ended_at": (("10.2.2",), "end, UTC (10.2.2: date and time)"),
    "status": (("10.2.2",), "how the session ended (10.2.2: success or failure)"),
    "exit_status": (("10.2.2",), "exit status of the remote command or shell"),
    "commands": (
        ("10.2.1.1", "10.2.1.2", "10.2.2", "7.2.1"),
        "every command or statement with the policy action and the rule that decided it",
    ),
    "approvals": (
        ("6.5.1", "7.2.1"),
        "approval requests with their approvers, decisions, reasons and times",
    ),
    "masking_counts": (
        ("3.4.1", "3.3.1", "3.5.1"),
        "card numbers and track data masked before they left the relay",
    ),
    "secrets_shown": (
        ("8.6.2", "7.2.5"),
        "secrets (custom patterns: API keys, tokens) the session showed the agent, masked: "
        "detector, time and cast line of each; the values are never kept",
    ),
    "recording": (
        ("10.3.2", "10.3.4", "10.2.1.1"),
        "the recording's SHA-256, hash chain and the verdict on its signed manifest",
    ),
    "audit_events": (
        ("10.2.1.3", "10.2.1.4", "10.2.2"),
        "audit events of the session (authentication, start and end, reads of the recording)",
    ),
}


def _secrets_shown(manifest: dict[str, Any]) -> dict[str, Any]:
    """Where the session showed custom secrets (masked), from its signed manifest."""
    positions = manifest.get("secrets_shown")
    return {
        "positions": positions if isinstance(positions, list) else [],
        "not_itemised": int(manifest.get("secrets_shown_dropped") or 0),
    }


class EvidenceError(CastgateError):
    """An evidence request that cannot be fulfilled (no sessions, directory in use)."""


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default)


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(session_id: str) -> str:
    """A session id as a directory name."""
    name = _SAFE.sub("_", session_id).strip(".") or "session"
    return name[:128]


def cast_file(cfg: Config, session: dict[str, Any]) -> Path | None:
    """Where a session's cast is, or None when the store names none. A cast that is
    not on this machine (recorded by another relay, or shipped with ``s3.keep_local``
    off) is fetched from ``[s3]`` into the local cache; ObjectStoreError when the bucket
    cannot be read."""
    raw = session.get("cast_path")
    if not raw:
        return None
    path = Path(str(raw))
    if path.is_absolute():
        return locate_cast(cfg, path)
    for base in (cfg.recordings_dir, cfg.data_path, cfg.base_dir):
        if (base / path).exists():
            return base / path
    return locate_cast(cfg, cfg.resolve(path))


@dataclass
class Session:
    """What the bundle holds about one session."""

    row: dict[str, Any]
    cast: Path | None
    record: dict[str, Any]


def audit_record(
    store: Store, cfg: Config, row: dict[str, Any], pinned: Ed25519PublicKey | None
) -> tuple[dict[str, Any], Path | None]:
    """The audit record of one session, every field mapped to PCI DSS requirements."""
    sid = str(row["id"])
    cast = cast_file(cfg, row)
    signed: dict[str, Any] = {}
    recording: dict[str, Any] = {
        "cast": cast.name if cast else None,
        "lines": row.get("lines"),
        "final_hash": row.get("final_hash"),
    }
    if cast is not None and cast.exists():
        report = verify_cast(cast, pinned)
        recording.update(
            file_sha256=file_sha256(cast),
            verdict=report.verdict.value,
            verdict_detail=report.message,
            signature=(
                "valid"
                if report.verdict in (Verdict.INTACT, Verdict.TRUNCATED_AUTHENTIC)
                else "not valid or absent"
            ),
        )
        sidecar = manifest_path(cast)
        if sidecar.exists():
            try:
                loaded = json.loads(sidecar.read_text(encoding="utf-8"))
            except ValueError:
                loaded = {}
            signed = loaded if isinstance(loaded, dict) else {}
            recording.update(
                manifest_file_sha256=signed.get("file_sha256"),
                signed_by=signed.get("key_id"),
                sealed_at=signed.get("sealed_at"),
            )
    else:
        recording.update(verdict="missing", verdict_detail="the recording file is not there")
    stored = store.get_manifest(sid)
    if stored is not None:
        recording["store_manifest_final_hash"] = stored.get("final_hash")
    shown = _secrets_shown(signed or stored or {})
    commands = [
        {
            "at": c["at"],
            "kind": c["kind"],
            "text": c["text"],
            "action": c["action"],
            "rule": c["rule"],
            "approval_id": c["approval_id"],
            "status": c["status"],
            "exit_status": c["exit_status"],
            "rows": c["rows"],
            "finished_at": c["finished_at"],
        }
        for c in store.list_commands(sid)
    ]
    approvals = [
        {
            "id": a["id"],
            "rule": a["rule"],
            "command": a["command"],
            "requested_by": a["identity"],
            "requested_at": a["requested_at"],
            "status": a["status"],
            "resolved_at": a["resolved_at"],
            "reason": a["reason"],
            "approver_groups": a["approver_groups"],
            "decisions": a["decisions"],
        }
        for a in store.list_approvals(session_id=sid)
    ]
    events = [
        {
            "at": e["at"],
            "kind": e["kind"],
            "actor": e["actor"],
            "outcome": e["outcome"],
            "origin": e["origin"],
            "resource": e["resource"],
            "detail": e["detail"],
        }
        for e in store.list_events(session_id=sid)
    ]
    credentials = [
        {"at": e["at"], **((e["detail"] or {}).get("credential") or {})}
        for e in events
        if e["kind"] == "credential.use"
    ]
    values: dict[str, Any] = {
        "identity": row.get("identity"),
        "groups": row.get("groups"),
        "auth_method": row.get("auth_method"),
        "oidc": row.get("attributes"),
        "credentials_used": credentials,
        "source_address": row.get("source"),
        "target": row.get("target"),
        "protocol": row.get("protocol"),
        "started_at": row.get("started_at"),
        "ended_at": row.get("ended_at"),
        "status": row.get("status"),
        "exit_status": row.get("exit_status"),
        "commands": commands,
        "approvals": approvals,
        "masking_counts": row.get("masking_counts") or {},
        "secrets_shown": shown,
        "recording": recording,
        "audit_events": events,
    }
    fields = {
        name: {"value": values[name], "pci_dss": list(reqs), "shows": shows}
        for name, (reqs, shows) in FIELDS.items()
    }
    by_requirement: dict[str, dict[str, Any]] = {}
    for name, (reqs, _) in FIELDS.items():
        for req in reqs:
            entry = by_requirement.setdefault(req, {"requirement": REQUIREMENTS[req], "fields": []})
            entry["fields"].append(name)
    record = {
        "format": RECORD_FORMAT,
        "session_id": sid,
        "run_id": row.get("run_id"),
        "title": row.get("title"),
        "node": row.get("node"),
        "fields": fields,
        "pci_dss_10_2_2": {
            "user identification": "identity",
            "type of event": "protocol (session) and commands[].kind",
            "date and time": "started_at, ended_at, commands[].at",
            "success or failure": "status, exit_status, commands[].status",
            "origination": "source_address",
            "affected resource": "target",
        },
        "pci_dss": dict(sorted(by_requirement.items(), key=lambda kv: _req_key(kv[0]))),
    }
    return record, cast


def _req_key(req: str) -> tuple[int, ...]:
    return tuple(int(p) for p in req.split("."))


def select_sessions(
    store: Store,
    session_ids: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """The sessions named, or those that started in [since, until), oldest first."""
    if session_ids:
        rows = []
        for sid in session_ids:
            row = store.get_session(sid)
            if row is None:
                raise EvidenceError(f"no session {sid} in the audit store")
            rows.append(row)
        return rows
    rows = store.list_sessions(since=since, until=until)
    rows.reverse()
    return rows


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _files(root: Path) -> Iterable[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def build_bundle(
    store: Store,
    cfg: Config,
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    actor: str,
    origin: str,
    selection: dict[str, Any],
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the evidence bundle for ``rows`` into the new directory ``out`` and return
    its manifest. Reading each session's recording and audit record is logged in the
    store first (``recording.read``, PCI DSS 10.2.1.3). With ``run`` (a
    ``Store.list_runs`` entry) the bundle also holds ``run-record.json`` and the run's
    timeline in ``index.html``."""
    if not rows:
        raise EvidenceError("no sessions match; nothing to put in the bundle")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvidenceError(f"{out} exists and is not empty; evidence is never overwritten")
    pub_path = cfg.keys_dir / PUBLIC_NAME
    pinned = load_public(pub_path) if pub_path.exists() else None
    out.mkdir(parents=True, exist_ok=True, mode=0o750)
    (out / "keys").mkdir()
    if pinned is not None:
        (out / "keys" / PUBLIC_NAME).write_bytes(public_pem(pinned))
    sessions: list[Session] = []
    for row in rows:
        sid = str(row["id"])
        cast = cast_file(cfg, row)
        readable = cast is not None and cast.exists()
        store.add_event(
            "recording.read",
            actor,
            "success" if readable else "failure",
            origin,
            f"session {sid}",
            {
                "purpose": "evidence",
                "reads": ["audit record", "recording"],
                "cast": str(cast) if cast else None,
                "bundle": str(out),
            },
            session_id=sid,
        )
        record, cast = audit_record(store, cfg, row, pinned)
        folder = out / "sessions" / safe_name(sid)
        folder.mkdir(parents=True)
        (folder / "audit-record.json").write_text(_dumps(record) + "\n", encoding="utf-8")
        if cast is not None and cast.exists():
            for src in (cast, chain_path(cast), manifest_path(cast)):
                if src.exists():
                    _copy(src, folder / src.name)
            with (folder / "replay.html").open("w", encoding="utf-8") as fh:
                export_html(folder / cast.name, fh, title=f"session {sid}")
        sessions.append(Session(row, cast, record))
    run_record = run_record_of(run, sessions) if run is not None else None
    if run_record is not None:
        (out / RUN_RECORD).write_text(_dumps(run_record) + "\n", encoding="utf-8")
    (out / "index.html").write_text(
        _index_html(sessions, selection, pinned, run_record), encoding="utf-8"
    )
    files = {
        p.relative_to(out).as_posix(): file_sha256(p)
        for p in _files(out)
        if p.name not in (BUNDLE_MANIFEST, SUMS)
    }
    (out / SUMS).write_text(
        "".join(f"{digest}  {name}\n" for name, digest in files.items()), encoding="utf-8"
    )
    files[SUMS] = file_sha256(out / SUMS)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "created_by": actor,
        "origin": origin,
        "selection": selection,
        "sessions": [str(s.row["id"]) for s in sessions],
        **({"run_id": run["run_id"]} if run is not None else {}),
        "files": dict(sorted(files.items())),
    }
    try:
        key = SigningKey.load(cfg.keys_dir)
    except SigningKeyError as exc:
        manifest["unsigned"] = str(exc)
    else:
        manifest["key_id"] = key.key_id
        manifest["public_key"] = public_raw_b64(key.public)
        manifest["signature"] = key.sign(_canonical(manifest))
    (out / BUNDLE_MANIFEST).write_text(_dumps(manifest) + "\n", encoding="utf-8")
    return manifest


# --- pipeline runs -----------------------------------------------------------------

# What the run record shows for each requirement it cites.
RUN_PCI_DSS: dict[str, str] = {
    "8.6.1": "initiator and attributes: every session of the pipeline's system account is "
    "attributable to the person who triggered the run (actor, triggering_actor, user_login)",
    "8.6.2": "secrets_read.credentials: the pipeline authenticated with a short-lived "
    "OIDC token; the target credentials were the relay's, named here, never in the pipeline",
    "8.2.1": "sessions[].identity and subject: one identity, bound to the run's claims",
    "7.2.5": "sessions[].groups: the bound identity's groups, not the token's",
    "10.2.1": "timeline: every session, command and statement, approval and credential use",
    "10.2.2": "timeline entries: who (identity), what (kind, text), when (at), outcome "
    "(action, status), where from (source), what was affected (target)",
    "6.5.1": "approvals: approver, time, reason and exactly what was approved (SHA-256)",
    "3.4.1": "masking_counts: card numbers masked before they reached the agent",
}


def _offset(at: Any, start: Any) -> float | None:
    if isinstance(at, datetime) and isinstance(start, datetime):
        return max(0.0, round((at - start).total_seconds(), 3))
    return None


def run_record_of(run: dict[str, Any], sessions: Sequence[Session]) -> dict[str, Any]:
    """The run record: the run's summary, its sessions, and one timeline of what
    happened across them (each entry linking to the replay at its time)."""
    timeline: list[dict[str, Any]] = []
    approvals: list[dict[str, Any]] = []
    credentials: list[dict[str, Any]] = []
    masking: dict[str, int] = {}
    shown_secrets: dict[str, int] = {}
    shown_where: list[dict[str, Any]] = []
    session_list: list[dict[str, Any]] = []
    for s in sessions:
        row, fields = s.row, s.record["fields"]
        sid = str(row["id"])
        start = row.get("started_at")
        folder = f"sessions/{safe_name(sid)}"
        has_replay = s.cast is not None and bool(fields["recording"]["value"].get("file_sha256"))

        replay = f"{folder}/replay.html" if has_replay else None

        def entry(
            at: Any,
            kind: str,
            sid: str = sid,
            start: Any = start,
            replay: str | None = replay,
            **more: Any,
        ) -> None:
            off = _offset(at, start)
            link = f"{replay}#t={off}" if replay is not None and off is not None else None
            timeline.append(
                {"at": at, "session": sid, "kind": kind, "offset": off, "replay": link, **more}
            )

        oidc = row.get("attributes") or {}
        session_list.append(
            {
                "id": sid,
                "identity": row.get("identity"),
                "groups": row.get("groups"),
                "subject": oidc.get("subject"),
                "attributes": oidc.get("attributes") or {},
                "target": row.get("target"),
                "protocol": row.get("protocol"),
                "source": row.get("source"),
                "started_at": start,
                "ended_at": row.get("ended_at"),
                "status": row.get("status"),
                "exit_status": row.get("exit_status"),
                "audit_record": f"{folder}/audit-record.json",
                "replay": f"{folder}/replay.html" if has_replay else None,
            }
        )
        entry(
            start,
            "session.start",
            identity=row.get("identity"),
            target=row.get("target"),
            protocol=row.get("protocol"),
            title=row.get("title"),
        )
        for c in fields["commands"]["value"]:
            entry(
                c["at"],
                "command",
                text=c["text"],
                command_kind=c["kind"],
                action=c["action"],
                rule=c["rule"],
                status=c["status"],
                exit_status=c["exit_status"],
                approval_id=c["approval_id"],
            )
        for a in fields["approvals"]["value"]:
            digest = hashlib.sha256(str(a["command"]).encode()).hexdigest()
            approvals.append({**a, "session": sid, "command_sha256": digest})
            entry(
                a["requested_at"],
                "approval.requested",
                approval_id=a["id"],
                rule=a["rule"],
                command=a["command"],
                command_sha256=digest,
                requested_by=a["requested_by"],
            )
            for d in a["decisions"]:
                entry(
                    d.get("at"),
                    "approval.decision",
                    approval_id=a["id"],
                    approver=d.get("approver"),
                    decision=d.get("decision"),
                    reason=d.get("reason"),
                    command=a["command"],
                    command_sha256=digest,
                )
        for c in fields["credentials_used"]["value"]:
            credentials.append({**c, "session": sid})
            entry(c["at"], "credential.use", credential={k: v for k, v in c.items() if k != "at"})
        for pos in fields["secrets_shown"]["value"]["positions"]:
            t = float(pos.get("t") or 0)
            at = start + timedelta(seconds=t) if isinstance(start, datetime) else None
            shown_where.append({**pos, "session": sid})
            entry(at, "secret.shown", detector=pos.get("detector"), count=pos.get("count"))
        counts = fields["masking_counts"]["value"] or {}
        for detector, n in counts.items():
            masking[detector] = masking.get(detector, 0) + int(n)
            if detector not in ("pan", "track") and n:
                shown_secrets[detector] = shown_secrets.get(detector, 0) + int(n)
        if row.get("ended_at") is not None:
            entry(
                row.get("ended_at"),
                "session.end",
                status=row.get("status"),
                exit_status=row.get("exit_status"),
                masking_counts=counts,
            )
    timeline.sort(
        key=lambda e: (
            e["at"].timestamp() if isinstance(e["at"], datetime) else float("inf"),
            e["session"],
        )
    )
    return {
        "format": RUN_FORMAT,
        "run_id": run["run_id"],
        "provider": run.get("provider"),
        "initiator": run.get("initiator"),
        "repository": run.get("repository"),
        "ref": run.get("ref"),
        "sha": run.get("sha"),
        "workflow": run.get("workflow"),
        "environment": run.get("environment"),
        "attributes": run.get("attributes") or {},
        "first_started_at": run.get("first_started_at"),
        "last_ended_at": run.get("last_ended_at"),
        "figures": {
            k: run.get(k)
            for k in ("sessions", "commands", "blocked", "held", "approvals", "masked")
        },
        "sessions": session_list,
        "approvals": approvals,
        "masking_counts": masking,
        "secrets_read": {
            "credentials": credentials,
            # Custom secret patterns masked in what the agent was shown, per detector.
            "masked_secret_patterns": shown_secrets,
            # ... and where: each occurrence's session, time and cast line.
            "shown_masked": shown_where,
        },
        "timeline": timeline,
        "pci_dss": {
            req: {"requirement": REQUIREMENTS[req], "shown_by": shows}
            for req, shows in sorted(RUN_PCI_DSS.items(), key=lambda kv: _req_key(kv[0]))
        },
    }


def _timeline_html(run: dict[str, Any]) -> str:
    out = io.StringIO()
    out.write(f"<h2>Pipeline run {html.escape(str(run['run_id']))}</h2>\n<table>")
    for label, key in (
        ("initiated by", "initiator"),
        ("repository", "repository"),
        ("ref", "ref"),
        ("commit", "sha"),
        ("workflow", "workflow"),
        ("environment", "environment"),
        ("provider", "provider"),
        ("first session", "first_started_at"),
        ("end", "last_ended_at"),
    ):
        out.write(f"<tr><th>{label}</th>{_td(run.get(key))}</tr>\n")
    out.write(f"<tr><th>figures</th>{_td(run.get('figures'))}</tr>\n")
    out.write(f"<tr><th>masked (by detector)</th>{_td(run.get('masking_counts'))}</tr>\n")
    creds = run["secrets_read"]["credentials"]
    out.write(
        "<tr><th>secrets read</th>"
        + _td(
            [
                f"{c.get('target')}: "
                + ", ".join(f"{k} {c[k]}" for k in ("env", "key_file", "fingerprint") if c.get(k))
                for c in creds
            ]
            + [
                f"{name}: {n} masked in output"
                for name, n in run["secrets_read"]["masked_secret_patterns"].items()
            ]
            or None
        )
        + "</tr>\n</table>\n"
    )
    out.write(
        f'<h3>Timeline</h3>\n<p>Also in <a href="{RUN_RECORD}">{RUN_RECORD}</a>.</p>\n'
        "<table><tr><th>time</th><th>session</th><th>what</th><th>detail</th></tr>\n"
    )
    for e in run["timeline"]:
        kind = str(e["kind"])
        if kind == "command":
            what = f"{e.get('command_kind')}: {e.get('text')}"
            detail = f"{e.get('action')}" + (f" ({e['rule']})" if e.get("rule") else "")
            if e.get("status"):
                detail += f", {e['status']}"
        elif kind == "approval.decision":
            what = f"approval #{e.get('approval_id')} {e.get('decision')} by {e.get('approver')}"
            detail = (
                f"reason: {e.get('reason') or '-'}; approved text: {e.get('command')} "
                f"(sha256 {str(e.get('command_sha256'))[:16]})"
            )
        elif kind == "approval.requested":
            what = f"approval #{e.get('approval_id')} requested by {e.get('requested_by')}"
            detail = f"rule {e.get('rule')}: {e.get('command')}"
        elif kind == "credential.use":
            cred = e.get("credential") or {}
            what = f"relay credential for {cred.get('target')}"
            detail = ", ".join(
                f"{k} {cred[k]}" for k in ("env", "key_file", "fingerprint") if cred.get(k)
            )
        elif kind == "secret.shown":
            what = f"secret shown to the agent, masked: {e.get('detector')}"
            detail = f"{e.get('count')} occurrence(s)"
        elif kind == "session.start":
            what = f"{e.get('identity')} -> {e.get('target')} ({e.get('protocol')})"
            detail = str(e.get("title") or "")
        else:
            what = f"end: {e.get('status')}"
            detail = f"exit {e.get('exit_status')}; masked {e.get('masking_counts') or {}}"
        link = f' <a href="{html.escape(str(e["replay"]))}">replay</a>' if e.get("replay") else ""
        out.write(
            f"<tr>{_td(e.get('at'))}<td>{html.escape(str(e['session']))}{link}</td>"
            f"<td>{html.escape(kind)}: {html.escape(what)}</td>{_td(detail)}</tr>\n"
        )
    out.write("</table>\n")
    return out.getvalue()


def _td(value: Any) -> str:
    if value is None or value == "":
        return "<td class=none>-</td>"
    if isinstance(value, datetime):
        value = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    elif isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    return f"<td>{html.escape(str(value))}</td>"


_INDEX_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.none { color: #999; }
.intact { color: #060; font-weight: bold; } .bad { color: #b00; font-weight: bold; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def _index_html(
    sessions: Sequence[Session],
    selection: dict[str, Any],
    pinned: Ed25519PublicKey | None,
    run: dict[str, Any] | None = None,
) -> str:
    out = io.StringIO()
    out.write('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n')
    out.write(f"<title>castgate evidence bundle</title><style>{_INDEX_CSS}</style></head><body>\n")
    out.write("<h1>castgate evidence bundle</h1>\n")
    out.write(
        f"<p>Generated {html.escape(datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC'))}; "
        f"selection: <code>{html.escape(json.dumps(selection, default=str))}</code>; "
        f"{len(sessions)} session(s). Relay signing key: "
        f"<code>{html.escape(key_id(pinned)) if pinned else 'not available'}</code> "
        f'(<a href="keys/{PUBLIC_NAME}">{PUBLIC_NAME}</a>).</p>\n'
    )
    if run is not None:
        out.write(_timeline_html(run))
        out.write("<h2>Sessions</h2>\n")
    out.write(
        "<table><tr><th>session</th><th>identity (groups)</th><th>auth</th><th>source</th>"
        "<th>target / protocol</th><th>start</th><th>end</th><th>status</th><th>exit</th>"
        "<th>commands (blocked)</th><th>approvals</th><th>masked</th><th>recording</th></tr>\n"
    )
    for s in sessions:
        row, fields = s.row, s.record["fields"]
        folder = f"sessions/{safe_name(str(row['id']))}"
        rec = fields["recording"]["value"]
        verdict = str(rec.get("verdict"))
        cls = "intact" if verdict == "intact" else "bad"
        commands = fields["commands"]["value"]
        blocked = sum(1 for c in commands if c["action"] == "block")
        approvals = fields["approvals"]["value"]
        links = [f'<a href="{folder}/audit-record.json">audit record</a>']
        if s.cast is not None and rec.get("file_sha256"):
            links.append(f'<a href="{folder}/{html.escape(s.cast.name)}">cast</a>')
            links.append(f'<a href="{folder}/replay.html">replay</a>')
        out.write(
            f"<tr><td>{html.escape(str(row['id']))}<br>{' · '.join(links)}</td>"
            + _td(f"{row.get('identity')} ({', '.join(row.get('groups') or [])})")
            + _td(row.get("auth_method"))
            + _td(row.get("source"))
            + _td(f"{row.get('target')} / {row.get('protocol')}")
            + _td(row.get("started_at"))
            + _td(row.get("ended_at"))
            + _td(row.get("status"))
            + _td(row.get("exit_status"))
            + _td(f"{len(commands)} ({blocked})")
            + _td(
                [
                    f"#{a['id']} {a['status']} "
                    + ", ".join(f"{d['approver']}: {d['decision']}" for d in a["decisions"])
                    for a in approvals
                ]
                or None
            )
            + _td(row.get("masking_counts") or {})
            + f'<td><span class="{cls}">{html.escape(verdict)}</span><br>'
            f"<small>{html.escape(str(rec.get('file_sha256') or ''))[:16]}</small></td></tr>\n"
        )
    out.write("</table>\n<h2>PCI DSS v4.0.1 requirements these records evidence</h2>\n<table>")
    out.write("<tr><th>requirement</th><th>what it asks</th><th>audit record fields</th></tr>\n")
    by_req: dict[str, list[str]] = {}
    for name, (reqs, _) in FIELDS.items():
        for req in reqs:
            by_req.setdefault(req, []).append(name)
    for req in sorted(by_req, key=_req_key):
        out.write(
            f"<tr><td>{req}</td><td>{html.escape(REQUIREMENTS[req])}</td>"
            f"<td>{html.escape(', '.join(by_req[req]))}</td></tr>\n"
        )
    out.write(
        "</table>\n<h2>Checking this bundle</h2>\n<p><code>castgate verify --key "
        f"keys/{PUBLIC_NAME} .</code> checks every file against <code>{BUNDLE_MANIFEST}"
        "</code> (signed with the relay's key) and every recording's hash chain and signed "
        f"manifest, and names any file that differs. Without castgate: <code>sha256sum -c "
        f"{SUMS}</code>. Pin the key to the one the relay operator gave you, not only the copy "
        "in this bundle.</p>\n</body></html>\n"
    )
    return out.getvalue()


# --- verification ---------------------------------------------------------------------


def is_bundle(path: Path) -> bool:
    """True when ``path`` is a directory holding an evidence manifest."""
    return (path / BUNDLE_MANIFEST).is_file()


def bundle_key(root: Path) -> Ed25519PublicKey | None:
    """The public key shipped in the bundle, if any."""
    path = root / "keys" / PUBLIC_NAME
    try:
        return load_public(path) if path.exists() else None
    except SigningKeyError:
        return None


def verify_bundle(root: Path, pinned: Ed25519PublicKey | None) -> list[Report]:
    """Check every file of a bundle against its manifest and the manifest's signature.
    Returns one INTACT report for the manifest, or one report per problem, each naming
    the file."""
    man_path = root / BUNDLE_MANIFEST
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [Report(man_path, Verdict.TAMPERED, f"evidence manifest unreadable: {exc}")]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return [Report(man_path, Verdict.TAMPERED, "evidence manifest lists no files")]
    problems: list[Report] = []
    key_desc = "unsigned"
    if "signature" in manifest:
        try:
            embedded: Ed25519PublicKey | None = public_from_raw_b64(str(manifest.get("public_key")))
        except ValueError:
            embedded = None
        shipped = bundle_key(root)
        key = pinned or shipped or embedded
        if pinned is not None:
            where = "pinned key"
        elif shipped is not None:
            where = f"the bundle's own key keys/{PUBLIC_NAME} (unpinned)"
        else:
            where = "key in the manifest (unpinned)"
        if key is None:
            ok, key_desc = False, "no usable public key"
        elif key_id(key) != manifest.get("key_id"):
            ok = False
            key_desc = f"signed by {manifest.get('key_id')}, not by the {where} {key_id(key)}"
        else:
            ok = verify_signature(key, _canonical(manifest), str(manifest["signature"]))
            key_desc = f"{where} {key_id(key)}"
        if not ok:
            problems.append(
                Report(
                    man_path, Verdict.TAMPERED, f"evidence manifest signature invalid: {key_desc}"
                )
            )
    listed: set[Path] = set()
    for name, digest in sorted(files.items()):
        path = root / name
        listed.add(path)
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(
                Report(
                    man_path, Verdict.TAMPERED, f"manifest names a path outside the bundle: {name}"
                )
            )
            continue
        if not path.is_file():
            problems.append(
                Report(path, Verdict.TAMPERED, "missing: listed in the evidence manifest")
            )
        elif file_sha256(path) != digest:
            problems.append(
                Report(
                    path,
                    Verdict.TAMPERED,
                    "SHA-256 differs from the evidence manifest (file changed)",
                )
            )
    for path in _files(root):
        if path == man_path or path in listed or path.name.endswith(INDEX_SUFFIX):
            continue
        problems.append(
            Report(path, Verdict.TAMPERED, "not listed in the evidence manifest (file added)")
        )
    if problems:
        return problems
    if "signature" not in manifest:
        return [
            Report(
                man_path,
                Verdict.UNSEALED,
                f"{len(files)} files match, but the evidence manifest is not signed "
                f"({manifest.get('unsigned', 'no signature')})",
            )
        ]
    return [
        Report(
            man_path,
            Verdict.INTACT,
            f"{len(files)} files match the evidence manifest, signature valid ({key_desc})",
        )
    ]
