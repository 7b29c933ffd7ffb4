"""The champion pointer: ``champion.json`` at the store's root names the model downstream consumers should use.

Reading it checks the model it names (its record and file digest) and falls back to the last intact
champion in the ``promotions`` history when the pointer is broken. Writing it is conditional on the
version read (``Store.write_if_unchanged``), with a new ``revision`` every time, so a writer that lost
a race learns it (``WriteConflict``) instead of overwriting another's decision.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from datetime import datetime
from typing import TypeVar

import pandas as pd
from pydantic import AliasChoices, BaseModel, Field

from storage import SIDECAR_LIMIT, RunId, Store, StoreError, StoreName, UnsafeKey, damage
from storage.tables import read_table
from tasks.training.model import ModelRef
from tasks.training.rebuilt import MODEL_LIMIT, DamagedModel

T = TypeVar("T")
POINTER_ATTEMPTS = 20  # a writer that keeps losing the race this often fails with a message instead


class ChampionError(RuntimeError):
    """A champion operation cannot be carried out: the message says why and what to do."""


class Champion(BaseModel):
    """What ``champion.json`` holds."""

    # Every value is bounded where the pointer is read: the gate quotes the run id in the reason a night writes into
    # its own ``promotions`` row, so a 200 000-character one (review 8) made every night's row one its readers skip.
    # A pointer that fails these checks is damaged: the last intact champion in history is used instead.
    model_key: StoreName
    sha256: str = Field(max_length=64)  # empty for a champion read from history until its model's record is read
    run_id: RunId
    # on mnist-selection, as the gate compared (champion.json before this release called it balanced_accuracy);
    # None for a champion promoted before the selection split existed
    selection_balanced_accuracy: float | None = Field(
        validation_alias=AliasChoices("selection_balanced_accuracy", "balanced_accuracy"),
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
    )
    test_accuracy: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    promoted_at: datetime
    reason: str = Field(max_length=16_000)  # a gate's or an operator's reason, cut by its writers at 4 000 characters
    forced: bool = False
    revision: str | None = Field(None, max_length=128)  # new with every write of the pointer: what a conditional write compares


class ChampionLookup(BaseModel):
    """The champion to compare against, and what was wrong with the pointer if it could not be used."""

    champion: Champion | None
    model: ModelRef | None = None  # the champion's model, its file checked against the recorded digest
    problem: str | None = None  # one sentence naming the broken pointer, when there was one
    fallback: bool = False  # the champion came from the promotions history, not the pointer
    version: str | None = None  # the pointer's version as read (S3 ETag): the next write is conditional on it
    damaged: str | None = None  # one sentence, when a champion's model was set aside as damaged (``setting_aside_damaged``)


def intact_model(store: Store, key: str, sha256: str | None = None) -> tuple[ModelRef | None, str | None]:
    """The model under ``key`` in this store, if the file its ``model.json`` names is there and matches
    the digest the pointer recorded (else the one in ``model.json``); else why not, in a few words."""
    try:
        info = store.model_info_file(key)
    except UnsafeKey as exc:  # a key from the pointer or the promotions table that leaves the store
        return None, f"its model key is refused: {exc}"
    if store.kind(info) != "file":
        return None, f"its model record {store.location(info)} is missing (or not a file)"
    try:
        recorded = ModelRef.model_validate_json(store.read_bytes(info, limit=SIDECAR_LIMIT))
    except (ValueError, OSError, StoreError) as exc:
        return None, damage(f"its model record {store.location(info)}", exc)
    expected = sha256 or recorded.sha256
    if store.kind(recorded.file_key) != "file":
        return None, f"its model file {store.location(recorded.file_key)} is missing (or not a file)"
    if not store.matches(recorded.file_key, expected, limit=MODEL_LIMIT):  # a larger file is not ours: not hashed
        return (
            None,
            f"its model file {store.location(recorded.file_key)} does not match the SHA-256 {expected[:12]}… recorded for it",
        )
    return recorded, None


def read_pointer(store: Store) -> Champion | None:
    data, _ = store.read_versioned(store.champion_file(), limit=SIDECAR_LIMIT)
    return None if data is None else Champion.model_validate_json(data)


def promotions(store: Store, columns: Collection[str] | None = None, newest: int | None = None) -> pd.DataFrame:
    """Every decision so far, oldest first (with ``columns``, only those and ``decided_at`` are read; with
    ``newest``, only the rows of that many newest partition files: ``read_table``)."""
    wanted = None if columns is None else {*columns, "decided_at"}
    rows = read_table(store, "promotions", columns=wanted, newest=newest)
    return rows.sort_values("decided_at", kind="stable").reset_index(drop=True)


# The promotions partition files the search for the last intact champion reads (a broken pointer's fallback, in the
# ingest step's label judge and the gate, both deciding steps): the newest by the listing's modification time. A
# night writes one, so a year of nights is 365: the last champion of an honest store promoted within the last 400
# nights is found. Reading every partition cost 4–8 ms each, so 100 000 planted ones would pass the gate's budget
# and no night would decide again; 400 cost about 2 s (docs/security.md, measured).
MAX_PROMOTIONS_SEARCHED = 400


def champions_in_history(store: Store) -> list[Champion]:
    """Every model made champion in the newest ``MAX_PROMOTIONS_SEARCHED`` promotions partitions, latest first, as
    pointers (their files not yet checked)."""
    rows = promotions(store, newest=MAX_PROMOTIONS_SEARCHED)
    # an operator's row has no night (run_id null): its champion's run is the night whose gate first decided on it
    nightly = rows[rows["run_id"].notna()].drop_duplicates("challenger_model_key")
    trained_by = dict(zip(nightly["challenger_model_key"], nightly["run_id"]))
    rows = rows[rows["decision"] == "promoted"].iloc[::-1]
    found = []
    for r in rows.itertuples():
        run_id = r.run_id if isinstance(r.run_id, str) else trained_by.get(r.challenger_model_key)
        if run_id is None:
            store.warn(f"The champion {str(r.challenger_model_key)[:64]!r} of {r.decided_at} has no night in promotions: skipped")
            continue
        try:
            found.append(
                Champion(
                    model_key=r.challenger_model_key,
                    sha256="",  # filled in by first_intact from the model's own record
                    run_id=run_id,
                    selection_balanced_accuracy=None
                    if pd.isna(r.challenger_selection_balanced_accuracy)
                    else r.challenger_selection_balanced_accuracy,
                    test_accuracy=r.challenger_test_accuracy,
                    promoted_at=r.decided_at.to_pydatetime(),
                    reason=r.reason,
                    forced=bool(r.forced),
                )
            )
        except ValueError as exc:  # a planted row (a model key outside the store): that row is damaged, not history
            store.warn(damage(f"A promotions row of run {str(r.run_id)[:64]!r}", exc))
    return found


MAX_LOOKED_AT = 10  # earlier champions a broken pointer's fallback checks, newest first, before it gives up


def first_intact(store: Store, candidates: list[Champion], skip: Collection[str] = ()) -> tuple[Champion, ModelRef] | None:
    """The first candidate (other than the models in ``skip``) whose model file is intact, with its SHA-256, and its
    model. At most ``MAX_LOOKED_AT`` distinct models are checked: each check may hash a file of up to ``MODEL_LIMIT``,
    and a store writer can plant any number of promoted rows, so an unbounded walk would spend the step's budget."""
    looked_at: set[str] = set()
    for candidate in candidates:
        if candidate.model_key in skip or candidate.model_key in looked_at:
            continue
        if len(looked_at) >= MAX_LOOKED_AT:
            store.warn(
                f"None of the {MAX_LOOKED_AT} latest earlier champions is intact; older ones are not looked at "
                "(a store with that many damaged champions needs an operator: `mnist-pipeline champion promote`)"
            )
            return None
        looked_at.add(candidate.model_key)
        ref, _ = intact_model(store, candidate.model_key)
        if ref is not None:
            return candidate.model_copy(update={"sha256": ref.sha256}), ref
    return None


def find_champion(store: Store) -> ChampionLookup:
    """The champion in ``champion.json``; if that pointer is broken, the last intact champion in history."""
    where = store.location(store.champion_file())
    pointer, problem = None, None
    try:
        data, version = store.read_versioned(store.champion_file(), limit=SIDECAR_LIMIT)
    except (StoreError, OSError) as exc:  # far too large to be ours; a folder, not a file (storage/door.py)
        problem, version = damage(f"The champion pointer {where}", exc), store.version(store.champion_file())
    else:
        try:
            pointer = None if data is None else Champion.model_validate_json(data)
        except ValueError as exc:
            problem = damage(f"The champion pointer {where}", exc)
        if pointer is not None:
            ref, why = intact_model(store, pointer.model_key, pointer.sha256)
            if ref is not None:
                return ChampionLookup(champion=pointer, model=ref, version=version)
            problem = f"The champion pointer {where} names model {pointer.model_key} from run {pointer.run_id}, but {why}"
    history = champions_in_history(store)
    if pointer is None and problem is None and not history:
        return ChampionLookup(champion=None, version=version)  # no champion yet
    if problem is None:
        problem = f"The champion pointer {store.location(store.champion_file())} is missing although models were promoted before"
    found = first_intact(store, history, skip=(pointer.model_key,) if pointer is not None else ())
    if found is not None:
        candidate, ref = found
        return ChampionLookup(
            champion=candidate,
            model=ref,
            problem=f"{problem}; using the last intact champion, run {candidate.run_id}.",
            fallback=True,
            version=version,
        )
    return ChampionLookup(champion=None, problem=f"{problem}, and no earlier champion is intact.", version=version)


MAX_SET_ASIDE = 10  # damaged champions set aside in one night before the night's model is judged as a first champion


def setting_aside_damaged(store: Store, lookup: ChampionLookup, use: Callable[[ModelRef], T]) -> tuple[ChampionLookup, T | None]:
    """``use(model)`` on the champion's model; when this code cannot rebuild it (``DamagedModel``: not a .keras
    archive, a config that is not JSON or another network, weights of other shapes, too large), the last
    intact champion in the promotions history is used instead, and so on. With none left, the lookup has no
    champion and no ``problem`` of its own, so the night judges its model as a first champion.

    The lookup returned says, in one sentence (``damaged``, also appended to ``problem``), what was set aside
    and what is compared against instead. The pointer is not touched here: only a gate decision or an
    operator rewrites it."""
    set_aside: list[str] = []
    first: tuple[str, str] | None = None  # the champion set aside first, and why
    history: list[Champion] | None = None  # read once: a store planted with thousands of damaged champions is read once
    while lookup.champion is not None and lookup.model is not None:
        if len(set_aside) >= MAX_SET_ASIDE:  # past that many, the history is not a fallback worth a night's budget
            lookup = lookup.model_copy(update={"champion": None, "model": None, "fallback": False})
            break
        try:
            value = use(lookup.model)
        except DamagedModel as exc:
            set_aside.append(lookup.champion.model_key)
            first = first or (f"The champion model {lookup.champion.model_key} of run {lookup.champion.run_id}", str(exc))
            history = champions_in_history(store) if history is None else history
            found = first_intact(store, history, skip=set_aside)
            candidate, ref = found if found is not None else (None, None)
            lookup = lookup.model_copy(update={"champion": candidate, "model": ref, "fallback": candidate is not None})
            continue
        if first is None:
            return lookup, value
        return _with_damage(lookup, first, f"compared against the last intact champion, run {lookup.champion.run_id}"), value
    if first is None:
        return lookup, None
    if len(set_aside) >= MAX_SET_ASIDE:  # earlier champions may be intact: not looked at, and not said to be damaged
        instead = (
            f"{len(set_aside)} damaged champions were set aside tonight, the most one night sets aside, "
            "so this night's model is judged as a first champion"
        )
        return _with_damage(lookup, first, instead), None
    return _with_damage(lookup, first, "no earlier champion is intact, so this night's model is judged as a first champion"), None


def _with_damage(lookup: ChampionLookup, first: tuple[str, str], instead: str) -> ChampionLookup:
    what, why = first
    sentence = f"{what} is damaged and set aside ({why.rstrip('.')}); {instead}."
    problem = sentence if not lookup.problem else f"{lookup.problem} {sentence}"
    return lookup.model_copy(update={"damaged": sentence, "problem": problem})


def write_pointer(store: Store, champion: Champion, version: str | None) -> Champion:
    """Write ``champion`` with a new revision, if the pointer is still the ``version`` read (``WriteConflict`` if not)."""
    written = champion.model_copy(update={"revision": uuid.uuid4().hex})
    store.write_if_unchanged(store.champion_file(), written.model_dump_json(indent=2).encode(), version)
    return written


def pointer_conflict(store: Store, what: str) -> ChampionError:
    return ChampionError(
        f"The champion pointer {store.location(store.champion_file())} was replaced by another writer {POINTER_ATTEMPTS} times "
        f"while {what}; nothing was written. Run it again."
    )
