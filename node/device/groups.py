"""Groups on a device (PROTOCOL.md section 27): membership operations, sender chains, and group
messages fanned out to every member device through the outbox.

The pure rules live in `node.protocol.groups` (the state a set of signed operations gives) and
`node.protocol.senderkey` (sender chains); this module keeps them in the database and turns them
into outbox rows:

- a change (create, add, remove, leave, promote, rename) is signed here, stored, and the group's
  whole log is queued as a `group-ops` content to every device of every member account (and of
  the accounts it removed), our own other devices included;
- a group text is encrypted once with this device's sender chain; the one sender-key message is
  queued (one outbox row per member device, as a `group` content) after our chain was queued,
  as a `sender-key` content, to every member device that has not had it;
- when an account leaves or is removed, our chain is dropped: the next message makes a new one,
  given only to the members then;
- received contents are applied inside the inbound batch's transaction (`receive`).

A member device is reachable if it is a device of a contact or of our own account: sessions are
pairwise (section 27.5 "Reachability"); members that are not our contacts are listed as
unreachable in `info`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node.clock import Clock
from node.device.account_devices import AccountDevices
from node.device.events import Event, GroupChanged, MessageReceived, MessageSent
from node.device.storage import Contact, Database, NewMessage
from node.errors import DecodeError, DecryptionFailed, GroupError, InvalidRecord, LimitExceeded
from node.protocol.content import GroupMessage, GroupOps, SenderKey, Text, decode_content, encode_content
from node.protocol.groups import MAX_GROUP_MEMBERS, GroupLog, GroupOp, GroupOpKind, GroupState
from node.protocol.inbound import ReceivedGroupContent
from node.protocol.keys import IdentityKey, IdentityKeyPair
from node.protocol.senderkey import ReceiverChain, SenderChain, peek_message

__all__ = ["GroupInfo", "GroupMember", "Groups"]

log = logging.getLogger(__name__)

#: Group messages kept aside per group while their sender's chain is on the way (PROTOCOL.md
#: section 27.6): a sender's `sender-key` is queued before its messages, so only a reordering of
#: retries holds any; the bound keeps a misbehaving member from filling the disk.
MAX_HELD_GROUP_MESSAGES = 1000
#: The key id under which `chain_given` records the devices that were sent the group's log: 32
#: zero bytes, which no chain's key id (the public key of a random signing seed) is in practice.
LOG_GIVEN = bytes(32)
#: Chains kept per member device and group: the current one and the one before, for messages
#: sent before a rotation that arrive after it.
PEER_CHAINS_KEPT = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupMember:
    """One member account of a group as this device sees it."""

    name: str  # our contact's name, "(you)", or the account id when not a contact
    account_id: str
    admin: bool
    reachable: bool  # we can encrypt to its devices (a contact, or our own account)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupInfo:
    """A group (`Node.group_info`, `Node.groups`)."""

    name: str  # the group's name here (unique among contacts and groups)
    group_id: str  # hex
    title: str  # the name the group's operations give it
    member: bool  # whether this account is (still) a member
    admin: bool
    members: tuple[GroupMember, ...]


class Groups:
    """The device's groups, over its database. Public methods that change something run their
    own transaction; `receive` runs inside the inbound batch's."""

    def __init__(self, *, db: Database, identity: IdentityKeyPair, device_key: bytes,
                 account_devices: AccountDevices, clock: Clock,
                 next_timestamp: Callable[[], int], kick: Callable[[bytes], None]) -> None:
        self.db = db
        self.identity = identity
        self.me = identity.public.to_bytes()
        self.device_key = device_key
        self.account_devices = account_devices
        self.clock = clock
        self.next_timestamp = next_timestamp
        self.kick = kick
        self._logs: dict[bytes, GroupLog] = {}

    # --- reading ----------------------------------------------------------------------------------

    def find(self, name: str) -> Contact | None:
        """The conversation row of the group called `name` here, or None: exactly that name,
        else (unless a contact has exactly that name) the one group it names ignoring case."""
        found = self.db.group_by_name(name)
        if found is None or (found[0].name != name and self.db.contact_by_name(name)):
            return None
        return found[0]

    def _log(self, group_id: bytes) -> GroupLog:
        cached = self._logs.get(group_id)
        if cached is None:
            cached = self._logs[group_id] = GroupLog.from_signed(group_id,
                                                                 self.db.group_ops(group_id))
        return cached

    def _named(self, name: str) -> tuple[Contact, GroupLog]:
        found = self.db.group_by_name(name)
        if found is None:
            raise GroupError(f"no group named {name!r}")
        return found[0], self._log(found[0].account)

    def info(self, name: str) -> GroupInfo:
        """The group called `name`; GroupError if there is none."""
        contact, log = self._named(name)
        return self._info(contact, log.state)

    def all(self) -> list[GroupInfo]:
        """Every group this device knows (including ones we left), by name."""
        return [self._info(c, self._log(c.account).state) for c, _ in self.db.groups()]

    def _info(self, contact: Contact, state: GroupState) -> GroupInfo:
        members = tuple(sorted(
            (GroupMember(name=self._who(a), account_id=IdentityKey(a).account_id(),
                         admin=a in state.admins, reachable=self._reachable(a))
             for a in state.members), key=lambda m: (m.name != "(you)", m.name)))
        return GroupInfo(name=contact.name, group_id=contact.account.hex(), title=state.name,
                         member=self.me in state.members, admin=self.me in state.admins,
                         members=members)

    def name_of(self, account: bytes) -> str:
        """How a member account is shown: our contact's name, "(you)", or its account id's
        start."""
        return self._who(account)

    def _who(self, account: bytes) -> str:
        if account == self.me:
            return "(you)"
        contact = self.db.contact_by_account(account)
        return contact.name if contact is not None else IdentityKey(account).account_id()[:12]

    def _reachable(self, account: bytes) -> bool:
        return account == self.me or self.db.contact_by_account(account) is not None

    def _devices_of(self, account: bytes) -> list[tuple[bytes, bytes]]:
        """(account, device) of each device of `account` we can encrypt to, this one excluded."""
        contact = self.account_devices.own if account == self.me else \
            self.db.contact_by_account(account)
        if contact is None:
            return []
        return [(account, d) for d in self.db.device_keys(contact.id) if d != self.device_key]

    def _member_devices(self, state: GroupState) -> list[tuple[bytes, bytes]]:
        return [t for a in sorted(state.members) for t in self._devices_of(a)]

    # --- changes ------------------------------------------------------------------------------------

    def create(self, name: str, members: Sequence[bytes]) -> GroupInfo:
        """A new group with us as its admin and `members` (identity keys of contacts)."""
        if not members:
            raise GroupError("a group needs at least one other member")
        if len(set(members)) + 1 > MAX_GROUP_MEMBERS:
            raise GroupError(f"a group has at most {MAX_GROUP_MEMBERS} members")
        group_id = os.urandom(32)
        now = self.clock.now_ms()
        log = GroupLog.create(self.identity, group_id=group_id, name=name,
                              members=sorted(set(members)), sent_at_ms=self.next_timestamp())
        with self.db.transaction():
            contact = self.db.add_group(group_id, name, now_ms=now)
            self._logs[group_id] = log
            self._store_and_notice(contact, log, log.ops, now)
            self._queue_log(contact, log, log.state.members)
        return self._info(contact, log.state)

    def change(self, name: str, kind: GroupOpKind, *, who: Sequence[bytes] = (),
               new_name: str | None = None) -> GroupInfo:
        """Sign and apply a change to the group `name`, then send the log to every member
        device (and to the accounts it removes). GroupError when the rule refuses it."""
        contact, log = self._named(name)
        before = log.state
        if self.me not in before.members:
            raise GroupError(f"you are not a member of {contact.name!r} any more")
        op = log.make(self.identity, kind, sent_at_ms=self.next_timestamp(), name=new_name,
                      who=who)
        now = self.clock.now_ms()
        with self.db.transaction():
            contact = self._store_and_notice(contact, log, [op], now, before=before)
            self._queue_log(contact, log, before.members | log.state.members)
        return self._info(contact, log.state)

    def _store_and_notice(self, contact: Contact, log: GroupLog, new: Sequence[GroupOp],
                          now: int, *, before: GroupState | None = None) -> Contact:
        """Store new operations and apply what changed (inside the caller's transaction):
        notices in the history, our membership, the group's name here, our chain dropped when
        someone left. Returns the conversation row (renamed, if the group was)."""
        group_id = contact.account
        self.db.add_group_ops(group_id, [(op.hash, op.signed) for op in new])
        state = log.state
        # The notices are those of the applied operations, whatever order they came in: one
        # applied before and voided now (a concurrent removal sorted earlier) loses its notice,
        # so every member device ends with the same lines (PROTOCOL.md section 27.3).
        for op in state.applied:
            self.db.insert_group_notice(contact, op.hash[:16], self._describe(op),
                                        sent_at_ms=op.sent_at_ms, now_ms=now)
        self.db.delete_group_notices(contact, [h[:16] for h in state.refused])
        if before is not None and before.name != state.name:
            contact = self.db.rename_group(contact, state.name)
        member = self.me in state.members
        self.db.set_group_member(group_id, member)
        gone = (before.members - state.members) if before is not None else set()
        if gone or not member:
            # A removed member must not read what is sent from now on (section 27.5).
            self.db.drop_own_chain(group_id)
            if not member:
                self.db.drop_peer_chains(group_id)
            else:
                self.db.drop_peer_chains(group_id, [d for a in gone
                                                    for _, d in self._devices_of(a)])
        return contact

    def _describe(self, op: GroupOp) -> str:
        def who(account: bytes) -> str:
            return "you" if account == self.me else self._who(account)
        actor = who(op.actor)
        names = ", ".join(who(w) for w in op.who)
        return {
            "create": f"{actor} created the group {op.name!r}" + (f" with {names}" if names else ""),
            "add": f"{actor} added {names}",
            "remove": f"{actor} removed {names}",
            "leave": f"{actor} left",
            "promote": f"{actor} made {names} admin",
            "rename": f"{actor} renamed the group to {op.name!r}",
        }[op.kind]

    def _queue_log(self, contact: Contact, log: GroupLog, accounts: frozenset[bytes] | set[bytes]
                   ) -> None:
        """Queue the group's whole log to every device of `accounts` we can reach."""
        targets = [t for a in sorted(accounts) for t in self._devices_of(a)]
        if not targets:
            return
        self._queue_log_to(contact, targets)
        for _, device in targets:
            self.kick(device)

    def _queue_log_to(self, contact: Contact, targets: Sequence[tuple[bytes, bytes]]) -> None:
        body = json.dumps({"g": contact.account.hex()})
        self.db.insert_outgoing(contact=contact, messages=[
            (os.urandom(16), "group-ops", body, self.next_timestamp())], devices=[],
            now_ms=self.clock.now_ms(), copies=targets)
        self.db.mark_chain_given(contact.account, LOG_GIVEN, [d for _, d in targets])

    def group_ops_content(self, group_id: bytes, message_id: bytes, sent_at_ms: int) -> GroupOps:
        """The `group-ops` content of a queued row, built at encryption time: the whole log as
        held then, in the order of PROTOCOL.md section 27.3."""
        return GroupOps(id=message_id, sent_at_ms=sent_at_ms, group_id=group_id,
                        ops=tuple(op.signed for op in self._log(group_id).ops))

    # --- messages -------------------------------------------------------------------------------

    def send_many(self, contact: Contact, texts: Sequence[str]) -> list[bytes]:
        """Encrypt each text once with our sender chain and queue it for every member device
        (after our chain, to the devices that do not have it). Returns the message ids."""
        group_id = contact.account
        state = self._log(group_id).state
        if self.me not in state.members:
            raise GroupError(f"you are not a member of {contact.name!r} any more")
        targets = self._member_devices(state)
        now = self.clock.now_ms()
        with self.db.transaction():
            self.db.forget_sent_group_control()
            # A member's device that joined since the last change (a device linked to its
            # account) learns the group from its log first (PROTOCOL.md section 27.5).
            told = self.db.chain_given(group_id, LOG_GIVEN)
            untold = [t for t in targets if t[1] not in told]
            if untold:
                self._queue_log_to(contact, untold)
            stored = self.db.own_chain(group_id)
            chain = SenderChain.from_bytes(stored) if stored else SenderChain.generate(group_id)
            given = self.db.chain_given(group_id, chain.key_id)
            missing = [t for t in targets if t[1] not in given]
            if missing:
                key_id, chain_key, iteration = chain.distribution()
                body = json.dumps({"g": group_id.hex(), "kid": key_id.hex(),
                                   "ck": chain_key.hex(), "n": iteration})
                self.db.insert_outgoing(contact=contact, messages=[
                    (os.urandom(16), "sender-key", body, self.next_timestamp())], devices=[],
                    now_ms=now, copies=missing)
                self.db.mark_chain_given(group_id, chain.key_id, [d for _, d in missing])
            ids, payloads = [], []
            rows: list[NewMessage] = []
            for text in texts:
                message_id, sent_at = os.urandom(16), self.next_timestamp()
                payloads.append(chain.encrypt(encode_content(
                    Text(id=message_id, sent_at_ms=sent_at, body=text))))
                rows.append((message_id, "text", text, sent_at))
                ids.append(message_id)
            rowids = self.db.insert_outgoing(contact=contact, messages=rows, devices=[],
                                             now_ms=now, copies=targets)
            self.db.set_group_payloads(zip(rowids, payloads, strict=True))
            self.db.save_own_chain(group_id, chain.to_bytes())
        for _, device in targets:
            self.kick(device)
        return ids

    def group_message_content(self, message_rowid: int, group_id: bytes, message_id: bytes,
                              sent_at_ms: int) -> GroupMessage | None:
        """The `group` content of a queued group text (the same bytes for every device), or
        None if the row is not one."""
        payload = self.db.group_payload(message_rowid)
        if payload is None:
            return None
        return GroupMessage(id=message_id, sent_at_ms=sent_at_ms, group_id=group_id,
                            message=payload)

    def is_group(self, account: bytes) -> bool:
        """Whether a conversation account is a group id."""
        return self.db.group_by_id(account) is not None

    # --- receiving (inside the inbound transaction) ------------------------------------------------

    def receive(self, item: ReceivedGroupContent, now_ms: int) -> list[Event]:
        """Apply one group content from a member device; returns the events to publish after
        the commit. What the rules refuse is logged and dropped (it was acknowledged: a
        resend would be refused the same way)."""
        content = item.content
        try:
            if isinstance(content, GroupOps):
                return self._receive_ops(item, content, now_ms)
            if isinstance(content, SenderKey):
                return self._receive_key(item, content, now_ms)
            return self._receive_message(item, content, now_ms)
        except (DecodeError, InvalidRecord, LimitExceeded, DecryptionFailed) as exc:
            log.info("group content %s from %s refused: %s", content.id.hex(),
                     IdentityKey(item.account).account_id()[:12], exc)
            return []

    def _receive_ops(self, item: ReceivedGroupContent, content: GroupOps, now: int
                     ) -> list[Event]:
        group_id = content.group_id
        known = self.db.group_by_id(group_id)
        glog = self._log(group_id) if known is not None else GroupLog(group_id)
        before = glog.state
        added: list[GroupOp] = []
        for signed in content.ops:
            try:
                added.extend(glog.receive(signed))
            except (DecodeError, InvalidRecord, LimitExceeded) as exc:
                log.info("group operation refused: %s", exc)
        if known is None:
            # An invitation: taken only if the log makes us a member.
            if self.me not in glog.state.members:
                raise InvalidRecord("the operations of a group we are not a member of")
            contact = self.db.add_group(group_id, glog.state.name, now_ms=now)
            self._logs[group_id] = glog
            self._store_and_notice(contact, glog, glog.ops, now)
            return [GroupChanged(group=contact.name, change="you were added",
                                 by=self._who(item.account))]
        if not added:
            return []
        contact = self._store_and_notice(known[0], glog, added, now, before=before)
        hashes = {op.hash for op in added}
        return [GroupChanged(group=contact.name, change=self._describe(op),
                             by=self._who(op.actor))
                for op in glog.state.applied if op.hash in hashes]

    def _receive_key(self, item: ReceivedGroupContent, content: SenderKey, now: int
                     ) -> list[Event]:
        group_id = content.group_id
        known = self.db.group_by_id(group_id)
        if known is None or item.account not in self._log(group_id).state.members:
            raise InvalidRecord("a sender key from a device that is not a member's")
        chain = ReceiverChain(group_id=group_id, key_id=content.key_id,
                              chain_key=content.chain_key, iteration=content.iteration)
        if self.db.peer_chain(group_id, item.device, content.key_id) is not None:
            return []  # a repeat: the chain we hold has moved on, keep it
        self.db.save_peer_chain(group_id, item.device, content.key_id, chain.to_bytes(),
                                now_ms=now, keep=PEER_CHAINS_KEPT)
        # Messages that came before their chain (section 27.5), in the order they came.
        events: list[Event] = []
        done: list[int] = []
        for rowid, account, message_id, sent_at, message in self.db.held_group_messages(
                group_id, item.device):
            if peek_message(message)[1] != content.key_id:
                continue
            done.append(rowid)
            held = GroupMessage(id=message_id, sent_at_ms=sent_at, group_id=group_id,
                                message=message)
            try:
                events.extend(self._open(known[0], account, item.device, held, now))
            except (DecodeError, DecryptionFailed, LimitExceeded) as exc:
                log.info("held group message %s dropped: %s", message_id.hex(), exc)
        self.db.drop_held_group_messages(done)
        return events

    def _receive_message(self, item: ReceivedGroupContent, content: GroupMessage, now: int
                         ) -> list[Event]:
        group_id = content.group_id
        known = self.db.group_by_id(group_id)
        if known is None or not known[1]:
            raise InvalidRecord("a message of a group we are not a member of")
        if item.account not in self._log(group_id).state.members:
            raise InvalidRecord("a group message from an account that is not a member")
        _, key_id, _ = peek_message(content.message)
        if self.db.peer_chain(group_id, item.device, key_id) is None:
            if not self.db.hold_group_message(group_id, item.account, item.device, content.id,
                                              content.sent_at_ms, content.message,
                                              limit=MAX_HELD_GROUP_MESSAGES):
                raise LimitExceeded("MAX_HELD_GROUP_MESSAGES", "group message dropped")
            return []
        return self._open(known[0], item.account, item.device, content, now)

    def _open(self, contact: Contact, account: bytes, device: bytes, content: GroupMessage,
              now: int) -> list[Event]:
        group_id = content.group_id
        _, key_id, _ = peek_message(content.message)
        stored = self.db.peer_chain(group_id, device, key_id)
        if stored is None:
            raise DecryptionFailed("no chain")
        chain = ReceiverChain.from_bytes(stored)
        text = decode_content(chain.decrypt(content.message))
        if not isinstance(text, Text) or text.id != content.id or \
                text.sent_at_ms != content.sent_at_ms:
            raise DecodeError("a group message whose inner text differs from its envelope")
        self.db.save_peer_chain(group_id, device, key_id, chain.to_bytes(), now_ms=now,
                                keep=PEER_CHAINS_KEPT)
        if account == self.me:
            # From another device of ours: our own message, filed as sent (as a sent transcript
            # is, PROTOCOL.md section 25.5).
            if not self.db.insert_transcripts(contact=contact, now_ms=now, messages=[
                    (text.id, text.body, text.sent_at_ms)]):
                return []
            return [MessageSent(message_id=text.id.hex(), contact=contact.name)]
        if not self.db.insert_group_incoming(contact, account, text.id, text.body,
                                             text.sent_at_ms, received_at_ms=now):
            return []
        return [MessageReceived(message_id=text.id.hex(), contact=contact.name, text=text.body,
                                sent_at_ms=text.sent_at_ms, received_at_ms=now,
                                sender=self._who(account))]
