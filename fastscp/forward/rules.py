"""Forwarding rules: which stored instance goes to which destination. No I/O: records in, names out.

A rule matches an :class:`~fastscp.index.records.InstanceRecord` when every
condition it gives matches (calling AE titles, modalities, SOP classes,
header fields); it then names its destinations. Header fields are named by
DICOM keyword, as ``fastscp query`` names them (:func:`fastscp.query.attributes.attribute_for`
decides which keywords exist), and matched with the C-FIND rules of PS3.4
C.2.2.2 that make sense on one instance: ``*`` and ``?`` wildcards, a
backslash between alternatives, Person Names without regard to case,
numbers as numbers; a multi-valued attribute matches when any value does.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword

from fastscp.config import ConfigError, ForwardingConfig
from fastscp.dicom.fields import ALL_VALUES, FIELDS
from fastscp.dicom.sopclasses import resolve_sop_classes
from fastscp.index.records import InstanceRecord
from fastscp.query.attributes import attribute_for

#: fastscp's own keys (not in the header) -> how a record gives them.
_OWN: dict[str, Callable[[InstanceRecord], object]] = {
    "CallingAETitle": lambda r: r.calling_ae_title,
    "CalledAETitle": lambda r: r.called_ae_title,
    "PeerAddress": lambda r: r.peer_address,
    "TransferSyntaxUID": lambda r: r.transfer_syntax_uid,
    "AvailableTransferSyntaxUID": lambda r: r.transfer_syntax_uid,
    "Path": lambda r: r.path,
    "ContentHash": lambda r: r.content_hash,
    "Bytes": lambda r: r.size,
}
#: Keys the index has that say nothing about an instance as it arrives.
_NOT_MATCHABLE = frozenset({"ReceivedAt", "ThumbnailPath"})
_FIELD_OF_TAG = {tag: name for tag, name, _kind in FIELDS}
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class FieldMatch:
    keyword: str
    vr: str
    #: The alternatives of the matching value (backslash-separated); empty: matches everything.
    alternatives: tuple[str, ...]

    @property
    def from_map(self) -> bool:
        """Read from the attribute map (not a column of its own)."""
        return self.keyword not in _OWN and tag_for_keyword(self.keyword) not in _FIELD_OF_TAG

    def value_of(self, record: InstanceRecord) -> str:
        """The keyword's value in the record as text (multiple values backslash-separated); "" if absent."""
        own = _OWN.get(self.keyword)
        if own is not None:
            return _text(own(record))
        tag = tag_for_keyword(self.keyword)
        assert tag is not None  # checked by compile_rules
        name = _FIELD_OF_TAG.get(tag)
        if name is not None:
            every = ALL_VALUES.get(name)
            if every and getattr(record.header, every):
                return str(getattr(record.header, every))
            return _text(getattr(record.header, name))
        try:
            found = json.loads(record.header.attributes or "{}").get(f"{tag:08X}")
        except ValueError:
            return ""
        return _text(found)

    def matches(self, record: InstanceRecord) -> bool:
        if not self.alternatives:
            return True
        values = self.value_of(record).split("\\")
        return any(self._one(value.strip(), pattern) for value in values for pattern in self.alternatives)

    def _one(self, value: str, pattern: str) -> bool:
        if self.vr in _NUMERIC_VRS:
            try:
                return float(value) == float(pattern)
            except ValueError:
                return False
        if self.vr == "PN":
            value, pattern = value.casefold(), pattern.casefold()
        if "*" in pattern or "?" in pattern:
            # fnmatch's own bracket classes are not DICOM wildcards.
            return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))
        return value == pattern


@dataclass(frozen=True)
class Rule:
    destinations: tuple[str, ...]
    calling_ae_titles: frozenset[str]
    modalities: frozenset[str]
    sop_classes: frozenset[str]
    fields: tuple[FieldMatch, ...]

    def matches(self, record: InstanceRecord) -> bool:
        if self.calling_ae_titles and record.calling_ae_title.strip() not in self.calling_ae_titles:
            return False
        if self.modalities and (record.header.modality or "").upper() not in self.modalities:
            return False
        if self.sop_classes and (record.header.sop_class_uid or "") not in self.sop_classes:
            return False
        return all(field.matches(record) for field in self.fields)


def compile_rules(forwarding: ForwardingConfig, source: str) -> tuple[Rule, ...]:
    """The rules of ``forwarding``, ready to match.

    Raises
    ------
    ConfigError
        A field keyword the index does not keep; the message names the key and ``source``.
    """
    rules = []
    for n, rule in enumerate(forwarding.rules):
        fields = []
        for keyword, value in rule.fields.items():
            attribute = attribute_for(keyword)
            if attribute is None or attribute.derived or keyword in _NOT_MATCHABLE or (
                    keyword not in _OWN and tag_for_keyword(keyword) is None):
                raise ConfigError(
                    f"{source}: forwarding.rules[{n}].fields.{keyword}: not a header field fastscp indexes "
                    f"(a DICOM keyword such as StudyDescription, or one of {', '.join(sorted(_OWN))})")
            alternatives = tuple(a.strip() for a in str(value).split("\\"))
            if any(a == "" or (a.strip("*") == "" and attribute.vr not in _NUMERIC_VRS) for a in alternatives):
                alternatives = ()  # an empty (or "*") alternative matches everything
            fields.append(FieldMatch(keyword, attribute.vr, alternatives))
        rules.append(Rule(
            destinations=tuple(rule.destinations),
            calling_ae_titles=frozenset(a.strip() for a in rule.calling_ae_titles),
            modalities=frozenset(m.strip().upper() for m in rule.modalities),
            sop_classes=frozenset(resolve_sop_classes(rule.sop_classes) if rule.sop_classes else ()),
            fields=tuple(fields),
        ))
    return tuple(rules)


def destinations_for(rules: tuple[Rule, ...], record: InstanceRecord) -> list[str]:
    """The destinations of every rule that matches, each once, in rule order."""
    found: dict[str, None] = {}
    for rule in rules:
        if rule.matches(record):
            found.update(dict.fromkeys(rule.destinations))
    return list(found)


def needs_attribute_map(rules: tuple[Rule, ...]) -> bool:
    """True if a rule matches an attribute that only the attribute map holds."""
    return any(field.from_map for rule in rules for field in rule.fields)
