"""What an MQTT broker says about itself and about why it ends a connection.

:class:`BrokerCapabilities` is read from the whole CONNACK (MQTT 5 announces its limits
there; MQTT 3.1.1 announces nothing, so every capability is assumed and ``announced`` is
False). The tables of reason codes turn a refusal or a DISCONNECT into words, and tell a
session whether connecting again can help: the broker's own reason decides a give-up,
never a guess from timing.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetprobe.transport.mqtt_codec import (
    MQTT_5,
    Properties,
    PropertyId,
    get_int_property,
    get_property,
)

DUPLICATE_CLIENT_ID = "duplicate_client_id"
"""The give-up reason of a session another client keeps taking over (0x8E)."""
UNKNOWN = "unknown"
"""The give-up reason when the broker keeps closing a session and never says why."""


@dataclass(frozen=True)
class BrokerCapabilities:
    """The broker's limits, as its CONNACK announced them (MQTT 5) or as assumed (3.1.1).

    ``receive_maximum`` None: not announced (MQTT 5's default is 65,535; 3.1.1 has none).
    """

    announced: bool = False
    maximum_qos: int = 2
    retain_available: bool = True
    wildcard_subscriptions: bool = True
    subscription_identifiers: bool = True
    shared_subscriptions: bool = True
    receive_maximum: int | None = None
    maximum_packet_size: int | None = None
    server_keep_alive: int | None = None
    topic_alias_maximum: int = 0
    assigned_client_id: str | None = None
    reason_string: str | None = None

    @classmethod
    def from_connack(cls, properties: Properties, level: int) -> BrokerCapabilities:
        """Read every capability a CONNACK of protocol ``level`` carries."""
        if level != MQTT_5:
            return cls()

        def flag(prop: PropertyId) -> bool:
            return get_int_property(properties, prop) != 0  # absent means available

        maximum_qos = get_int_property(properties, PropertyId.MAXIMUM_QOS)
        assigned = get_property(properties, PropertyId.ASSIGNED_CLIENT_IDENTIFIER)
        reason = get_property(properties, PropertyId.REASON_STRING)
        return cls(
            announced=True,
            maximum_qos=2 if maximum_qos is None else maximum_qos,
            retain_available=flag(PropertyId.RETAIN_AVAILABLE),
            wildcard_subscriptions=flag(PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE),
            subscription_identifiers=flag(PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE),
            shared_subscriptions=flag(PropertyId.SHARED_SUBSCRIPTION_AVAILABLE),
            receive_maximum=get_int_property(properties, PropertyId.RECEIVE_MAXIMUM) or None,
            maximum_packet_size=get_int_property(properties, PropertyId.MAXIMUM_PACKET_SIZE)
            or None,
            server_keep_alive=get_int_property(properties, PropertyId.SERVER_KEEP_ALIVE),
            topic_alias_maximum=get_int_property(properties, PropertyId.TOPIC_ALIAS_MAXIMUM) or 0,
            assigned_client_id=assigned if isinstance(assigned, str) else None,
            reason_string=reason if isinstance(reason, str) else None,
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, for the report (``mqtt.<role>.broker``)."""
        return {
            "announced": self.announced,
            "maximum_qos": self.maximum_qos,
            "retain_available": self.retain_available,
            "wildcard_subscriptions": self.wildcard_subscriptions,
            "subscription_identifiers": self.subscription_identifiers,
            "shared_subscriptions": self.shared_subscriptions,
            "receive_maximum": self.receive_maximum,
            "maximum_packet_size": self.maximum_packet_size,
        }


def server_reference(properties: Properties) -> str | None:
    """The Server Reference of a CONNACK or DISCONNECT (where to go instead), if any."""
    value = get_property(properties, PropertyId.SERVER_REFERENCE)
    return value if isinstance(value, str) else None


def reason_string(properties: Properties) -> str | None:
    """The broker's own words (Reason String property), if it gave any."""
    value = get_property(properties, PropertyId.REASON_STRING)
    return value if isinstance(value, str) else None


def describe(code: int, properties: Properties, names: dict[int, str]) -> str:
    """``reason 0x9b (QoS not supported: "Too high QoS")``, with the server reference."""
    text = f"reason 0x{code:02x} ({names.get(code, 'unknown reason')}"
    said = reason_string(properties)
    if said:
        text += f': "{said}"'
    text += ")"
    reference = server_reference(properties)
    if reference:
        text += f"; the broker points to {reference}"
    return text


CONNACK_311 = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
CONNACK_5 = {
    128: "unspecified error",
    129: "malformed packet",
    130: "protocol error",
    131: "implementation specific error",
    132: "unsupported protocol version",
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    140: "bad authentication method",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
    154: "retain not supported",
    155: "QoS not supported",
    156: "use another server",
    157: "server moved",
    159: "connection rate exceeded",
}
NOT_AUTHORIZED_CODES = frozenset({4, 5, 134, 135, 138, 140})
"""CONNACK codes that mean "these credentials will not do": retrying cannot help."""

# DISCONNECT reason codes of MQTT 5 (3.14.2.1): the name, and the give-up reason when
# connecting again cannot help (None: reconnect, the condition may pass).
DISCONNECT_REASONS: dict[int, tuple[str, str | None]] = {
    0x00: ("normal disconnection", None),
    0x80: ("unspecified error", None),
    0x81: ("malformed packet", "protocol_error"),
    0x82: ("protocol error", "protocol_error"),
    0x83: ("implementation specific error", None),
    0x87: ("not authorized", "not_authorized"),
    0x89: ("server busy", None),
    0x8B: ("server shutting down", None),
    0x8D: ("keep alive timeout", None),
    0x8E: ("session taken over", DUPLICATE_CLIENT_ID),
    0x8F: ("topic filter invalid", "protocol_error"),
    0x90: ("topic name invalid", None),  # one message's: the vehicle's others may pass
    0x93: ("receive maximum exceeded", None),
    0x94: ("topic alias invalid", "protocol_error"),
    0x95: ("packet too large", None),
    0x96: ("message rate too high", None),
    0x97: ("quota exceeded", None),
    0x98: ("administrative action", None),
    0x99: ("payload format invalid", "protocol_error"),
    0x9A: ("retain not supported", "retain_not_supported"),
    0x9B: ("QoS not supported", "qos_not_supported"),
    0x9C: ("use another server", "server_moved"),
    0x9D: ("server moved", "server_moved"),
    0x9E: ("shared subscriptions not supported", "protocol_error"),
    0x9F: ("connection rate exceeded", None),
    0xA0: ("maximum connect time", None),
    0xA1: ("subscription identifiers not supported", "protocol_error"),
    0xA2: ("wildcard subscriptions not supported", "protocol_error"),
}
DISCONNECT_NAMES = {code: name for code, (name, _) in DISCONNECT_REASONS.items()}


def give_up_reason(disconnect_code: int | None) -> str | None:
    """The give-up reason a broker's DISCONNECT code implies, or None: connect again."""
    if disconnect_code is None:
        return None
    return DISCONNECT_REASONS.get(disconnect_code, ("", None))[1]
