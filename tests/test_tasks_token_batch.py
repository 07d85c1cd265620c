"""One submit token for many tasks: ``max_tasks`` (fabric.tokens), a controller that
verifies each token's signature once (fabric.tasks.admission) and a client that
mints one token per batch (fabric.tasks.client)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetfixtures import controller_config, running
from natsfixtures import FabricPki
from workers.rig import TaskRig, fast_settings, task_rig

from fabric.controller.service import Controller
from fabric.tasks.admission import Admission, attach
from fabric.tasks.client import NewTask, Submitted, SubmitTokens, TaskClient, make_task
from fabric.tasks.records import TaskRecord, TaskState
from fabric.tokens import DEFAULT_LEEWAY, MAX_TASKS_PER_TOKEN, Claims, TokenIssuer
from schemas.errors import ContractError, ErrorCode
from schemas.task import Task

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


def pair(**kw: int) -> tuple[TokenIssuer, Admission]:
    """An issuer whose clock stands at NOW, and an admission that trusts its key."""
    return TokenIssuer(KEY, "tests", clock=lambda: NOW), Admission([KEY.public_key()], **kw)


def task(token: str | None, task_id: str, task_type: str = "echo") -> Task:
    return make_task(task_type, {"id": task_id}, task_id=task_id, token=token)[0]


def refusal(admission: Admission, one: Task, stored_at: float = NOW) -> ContractError:
    with pytest.raises(ContractError) as info:
        admission.check(one, stored_at)
    return info.value


def count_decodes(admission: Admission, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens whose signature the admission's verifier checked, in order."""
    verifier = admission._verifier
    decode = verifier.decode
    seen: list[str] = []

    def spy(token: str) -> Claims:
        seen.append(token)
        return decode(token)

    monkeypatch.setattr(verifier, "decode", spy)
    return seen


def claims_of(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def signed(claims: dict[str, object]) -> str:
    """A token with exactly these claims, signed with the real key."""
    return jwt.PyJWS().encode(json.dumps(claims).encode(), KEY, algorithm="EdDSA")


# --- the claim ---------------------------------------------------------------------------


def test_max_tasks_is_checked_when_minted_and_absent_by_default() -> None:
    issuer, _ = pair()
    for bad in (0, MAX_TASKS_PER_TOKEN + 1, True, 2.5, "3"):
        with pytest.raises(ValueError, match="max_tasks must be an integer from 1 to 10000"):
            issuer.mint("op-1", ["tasks:submit"], max_tasks=bad)  # type: ignore[arg-type]
    # Without the claim the token is as before: a verifier that predates it reads it.
    assert "max_tasks" not in claims_of(issuer.mint("op-1", ["tasks:submit"]))
    assert claims_of(issuer.mint("op-1", ["tasks:submit"], max_tasks=7))["max_tasks"] == 7


def test_a_token_in_the_old_form_admits_one_task() -> None:
    issuer, admission = pair()
    old = claims_of(issuer.mint("op-1", ["tasks:submit"]))
    old.update(agent=None, node=None)  # how tokens were encoded before the claim
    token = signed(old)
    assert admission.check(task(token, "t1"), NOW).submitted_by == "op-1"
    replayed = refusal(admission, task(token, "t2"))
    assert replayed.code is ErrorCode.TOKEN_REPLAYED
    assert replayed.message == "this token already submitted task 't1'"


def test_a_signed_claim_out_of_range_is_invalid() -> None:
    issuer, admission = pair()
    claims = claims_of(issuer.mint("op-1", ["tasks:submit"]))
    claims["max_tasks"] = MAX_TASKS_PER_TOKEN + 1
    assert refusal(admission, task(signed(claims), "t1")).code is ErrorCode.TOKEN_INVALID
    assert admission.remembered == (0, 0)


# --- admission ---------------------------------------------------------------------------


def test_a_token_admits_its_max_tasks_ids_and_their_redeliveries() -> None:
    issuer, admission = pair()
    token = issuer.mint("op-1", ["tasks:submit"], max_tasks=3)
    for task_id in ("t1", "t2", "t3"):
        admitted = admission.check(task(token, task_id), NOW)
        assert (admitted.submitted_by, admitted.token) == ("op-1", None)

    replayed = refusal(admission, task(token, "t4"))
    assert replayed.code is ErrorCode.TOKEN_REPLAYED
    assert replayed.message == "this token already submitted its 3 tasks (the first 't1')"
    # A redelivery of an admitted task is no replay, before and after the refusal.
    assert admission.check(task(token, "t2"), NOW + 30).submitted_by == "op-1"
    assert admission.remembered == (1, 3)


def test_the_signature_is_verified_once_for_many_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer, admission = pair()
    decoded = count_decodes(admission, monkeypatch)
    token = issuer.mint("op-1", ["tasks:submit"], max_tasks=100)
    for i in range(100):
        admission.check(task(token, f"t{i}"), NOW + i / 2)
    assert decoded == [token]
    assert admission.remembered == (1, 100)


def test_a_kept_token_is_still_checked_as_of_each_tasks_stored_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer, admission = pair()
    decoded = count_decodes(admission, monkeypatch)
    token = issuer.mint("op-1", ["tasks:submit"], ttl=60, not_before=NOW, max_tasks=10)
    admission.check(task(token, "t1"), NOW)
    exp = int(NOW + 60)

    assert refusal(admission, task(token, "late"), exp + DEFAULT_LEEWAY).code is (
        ErrorCode.TOKEN_EXPIRED
    )
    early = refusal(admission, task(token, "early"), int(NOW) - DEFAULT_LEEWAY - 1)
    assert early.code is ErrorCode.TOKEN_NOT_YET_VALID
    # The verifier's own leeway: just inside it on either side still passes.
    admission.check(task(token, "edge-late"), exp + DEFAULT_LEEWAY - 0.5)
    admission.check(task(token, "edge-early"), int(NOW) - DEFAULT_LEEWAY + 0.5)
    # An exec task needs more than this token grants, kept or not.
    assert refusal(admission, task(token, "x1", "exec")).code is ErrorCode.TOKEN_SCOPE
    assert decoded == [token]
    # Refusals bound no id: t1 and the two edges only.
    assert admission.remembered == (1, 3)


def test_a_kept_token_bound_to_a_target_is_still_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer, admission = pair()
    decoded = count_decodes(admission, monkeypatch)
    token = issuer.mint("op-1", ["tasks:submit"], agent="wa", max_tasks=5)
    for task_id in ("t1", "t2"):
        assert refusal(admission, task(token, task_id)).code is ErrorCode.TOKEN_WRONG_TARGET
    # Its signature is good, so it is kept; what it may do is checked each time.
    assert decoded == [token]
    assert admission.remembered == (1, 0)


def test_a_tampered_token_is_refused_and_never_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer, admission = pair()
    decoded = count_decodes(admission, monkeypatch)
    good = issuer.mint("op-1", ["tasks:submit"], max_tasks=2)
    header, _, signature = good.split(".")
    claims = claims_of(good)
    claims["max_tasks"] = 10_000
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header}.{forged_payload}.{signature}"

    for task_id in ("f1", "f2"):
        assert refusal(admission, task(forged, task_id)).code is ErrorCode.TOKEN_INVALID
    assert decoded == [forged, forged]  # verified, and refused, each time it is shown
    assert admission.remembered == (0, 0)
    # The genuine token is unaffected and keeps its own count.
    admission.check(task(good, "g1"), NOW)
    admission.check(task(good, "g2"), NOW)
    assert refusal(admission, task(good, "g3")).code is ErrorCode.TOKEN_REPLAYED


def test_memory_stays_bounded_and_the_oldest_token_goes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issuer, admission = pair(remember=5, verified_tokens=2)
    decoded = count_decodes(admission, monkeypatch)
    a, b, c = (issuer.mint("op-1", ["tasks:submit"], max_tasks=3) for _ in range(3))
    for token, prefix in ((a, "a"), (b, "b")):
        for i in range(3):
            admission.check(task(token, f"{prefix}{i}"), NOW)
    # Six ids would exceed five: token a, the least recent, is forgotten whole.
    assert admission.remembered == (2, 3)
    admission.check(task(c, "c0"), NOW)
    assert admission.remembered == (2, 4)  # b's 3 and c's 1; a's signature dropped too
    assert decoded == [a, b, c]
    # b is still held to its count; a, forgotten, is verified again if it comes back.
    assert refusal(admission, task(b, "b3")).code is ErrorCode.TOKEN_REPLAYED
    admission.check(task(a, "a0"), NOW)
    assert decoded == [a, b, c, a]
    assert admission.remembered[0] == 2 and admission.remembered[1] <= 5


# --- the client's tokens -----------------------------------------------------------------


class Minted:
    """An issuer that counts what it mints."""

    def __init__(self, issuer: TokenIssuer | None = None) -> None:
        self.issuer = issuer or TokenIssuer(KEY, "tests")
        self.count = 0
        mint = self.issuer.mint

        def counted(*args: object, **kw: object) -> str:
            self.count += 1
            return mint(*args, **kw)  # type: ignore[arg-type]

        self.issuer.mint = counted  # type: ignore[method-assign]


def test_submit_tokens_renew_when_spent_or_half_their_life_is_gone() -> None:
    minted = Minted()
    now = [0.0]
    tokens = SubmitTokens(minted.issuer, "op-1", per_token=3, ttl=60, clock=lambda: now[0])
    handed = [tokens() for _ in range(4)]
    assert handed[0] == handed[1] == handed[2] != handed[3]
    assert claims_of(handed[0])["max_tasks"] == 3
    now[0] = 29.0
    assert tokens() == handed[3]
    now[0] = 30.0  # half of 60 s since handed[3] was minted
    assert tokens() != handed[3]
    assert minted.count == tokens.minted == 3


def test_a_client_mints_for_many_tasks_only_from_an_issuer_of_its_own() -> None:
    # A given `token` callable is called per task and used as given (see
    # test_tasks_admission); both at once would leave it unclear which counts.
    with pytest.raises(ValueError, match="give token or issuer, not both"):
        TaskClient(None, submitted_by="op-1", token=lambda: "t", issuer=Minted().issuer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs submitted_by"):
        TaskClient(None, issuer=Minted().issuer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_token must be 1 to 10000"):
        SubmitTokens(Minted().issuer, "op-1", per_token=0)


# --- through NATS ------------------------------------------------------------------------


@pytest.fixture
async def rig(pki: FabricPki, tmp_path: Path) -> AsyncIterator[TaskRig]:
    async with task_rig(pki, tmp_path) as rig:
        yield rig


def issuer_of(pki: FabricPki) -> Minted:
    return Minted(TokenIssuer.from_file(pki.dir / "signing.key", "batch-test"))


def all_submitted(outcomes: list[Submitted | Exception]) -> list[Submitted]:
    done = [o for o in outcomes if isinstance(o, Submitted)]
    assert len(done) == len(outcomes), [o for o in outcomes if not isinstance(o, Submitted)]
    return done


async def test_submit_many_runs_50_tasks_on_one_token(rig: TaskRig, pki: FabricPki) -> None:
    dispatcher = await rig.dispatcher()
    attach(dispatcher, Admission.from_files(pki.dir / "signing.pub", require_token=True))
    await rig.worker("wa", "echo")
    minted = issuer_of(pki)
    tasks = TaskClient(await rig.clients("op-1"), submitted_by="alice", issuer=minted.issuer)

    outcomes = await tasks.submit_many(
        (NewTask("echo", {"n": i}, id=f"b-{i}") for i in range(50)), window=16
    )
    done = all_submitted(outcomes)
    assert [s.task.id for s in done] == [f"b-{i}" for i in range(50)]
    assert len({s.task.token for s in done}) == 1 and minted.count == 1

    records = await asyncio.gather(*(tasks.wait(s.task.id, within=30) for s in done))
    assert {(r.state, r.submitted_by) for r in records} == {(TaskState.SUCCEEDED, "alice")}
    assert dispatcher.counts["refused"] == 0


async def test_a_controller_requiring_tokens_admits_a_batch_and_reports_bad_input_per_task(
    rig: TaskRig, pki: FabricPki
) -> None:
    config = controller_config(pki, "ctl-1", require_submit_token=True)
    ctl = Controller(await rig.clients("ctl-1"), config)
    ctl.task_settings = fast_settings()  # type: ignore[attr-defined]
    minted = issuer_of(pki)
    async with running(ctl):
        await asyncio.wait_for(ctl.dispatcher.ready.wait(), 10)
        tasks = TaskClient(await rig.clients("op-1"), submitted_by="alice", issuer=minted.issuer)
        batch = [NewTask("nobody", {"n": i}, id=f"q-{i}") for i in range(5)]
        batch.insert(2, NewTask("nobody", id="not an id"))
        outcomes = await tasks.submit_many(batch)

        assert isinstance(outcomes[2], ContractError)
        assert outcomes[2].code is ErrorCode.INVALID_ID
        done = all_submitted(outcomes[:2] + outcomes[3:])
        assert minted.count == 1

        def admitted(record: TaskRecord) -> bool:
            return record.submitted_by == "alice" and record.state is TaskState.QUEUED

        for s in done:  # no capable agent: each waits in the queue, admitted
            await rig.record_until(tasks.nc, s.task.id, admitted)
        assert ctl.dispatcher.counts["refused"] == 0
