"""
Configuration: main.cf syntax, the parameter table, ``$name`` expansion.

The file format is Postfix's main.cf(5):

- ``name = value``; white space around ``=`` and at the end is ignored.
- A line that starts with white space continues the previous logical line.
- A line whose first non-blank character is ``#`` is a comment.  (As in
  Postfix, ``#`` in the middle of a value is part of the value.)
- ``$name``, ``${name}`` and ``$(name)`` expand to another parameter's
  value, at use time, recursively; ``${name?text}`` gives ``text`` when
  ``name`` is non-empty, ``${name:text}`` when it is empty; ``$$`` is ``$``.

Values are typed by the parameter table below: booleans (yes/no), integers,
times (a number with an optional unit s, m, h, d or w; a bare number takes
the parameter's default unit; we also accept a decimal number, which Postfix
does not), lists (separated by commas and/or white space) and strings.

Every parameter relayagent reads is in ``PARAMETERS``, with Postfix 3.7's
default (as ``postconf -d`` prints it) where Postfix has the parameter.
Parameters of our own are marked ``ours=True``.  An unknown name in main.cf
is a warning naming the file and line; a bad value is a ``ConfigError``
naming the file, line, parameter and expected form, and relayagent does not
start.

SYNOPSIS

    config = Config.load("/etc/relayagent/main.cf")   # or from_text(text), defaults()
    config["smtp_helo_timeout"]          # typed: 300.0
    config.raw("myorigin"), config.warnings, config.replace(relayhost="[mx]:25")
    postconf_lines(config, "non-default")               # what relayagent -n prints
    parse_time("5m"), split_list("a, b c")

DIAGNOSTICS

``Config.load``, ``from_text`` and ``replace`` raise ``ConfigError`` (one
line per problem: file, line, parameter, expected form) for an
unreadable or non-UTF-8 file, a syntax error, a bad ``$name`` expansion
or a bad value; unknown names are only ``warnings``.  ``config[name]``
of a name not in ``PARAMETERS`` is ``KeyError``; ``parse_time`` and
``convert`` raise ``ValueError``; ``postconf_lines`` raises ``KeyError``
for an unknown name.

Owns: myhostname, mydomain, myorigin, mail_name, queue_directory, and the
table itself.  The phase modules own the rest (see each module's header).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Self


class ConfigError(Exception):
    """A configuration file or value that relayagent cannot run with."""


class Kind(Enum):
    """The type of a parameter's value: how its text is checked and what
    ``config[name]`` gives (str, bool, int, float seconds, tuple of str)."""
    STRING = "string"
    BOOL = "boolean"
    INT = "integer"
    TIME = "time"
    LIST = "list"


@dataclass(frozen=True)
class Parameter:
    """One row of the parameter table."""

    name: str
    default: str
    kind: Kind
    doc: str
    unit: str = "s"  # default time unit, for Kind.TIME
    choices: tuple[str, ...] | None = None  # allowed words (STRING, each LIST item, or instead of an INT)
    minimum: int | None = None  # for Kind.INT and Kind.TIME (in seconds)
    ours: bool = False  # an extension of relayagent's, not a Postfix parameter
    path: bool = False  # a file or directory name, resolved against base_dir

    def expected_form(self) -> str:
        """The form a value must have, for error messages."""
        if self.kind is Kind.BOOL:
            return "yes or no"
        if self.kind is Kind.INT:
            floor = "" if self.minimum is None else f" >= {self.minimum}"
            words = "".join(f"{word} or " for word in self.choices or ())
            return f"{words}an integer{floor}"
        if self.kind is Kind.TIME:
            return (
                "a time: a number with an optional unit s (seconds), m (minutes), "
                f"h (hours), d (days) or w (weeks); default unit {self.unit}"
            )
        if self.choices:
            what = "a list of" if self.kind is Kind.LIST else "one of"
            return f"{what} {', '.join(self.choices)}"
        return "a list" if self.kind is Kind.LIST else "a string"


def _p(name: str, default: str, kind: Kind, doc: str, **extra: Any) -> Parameter:
    return Parameter(name, default, kind, doc, **extra)


S, B, N, T, L = Kind.STRING, Kind.BOOL, Kind.INT, Kind.TIME, Kind.LIST

_TLS_LEVELS = ("", "none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure")

# The table.  Order follows the phases: identity, queue, scheduler, nexthop
# and addresses, connection, session, MIME, SASL, TLS, bounces, logging,
# listener.
_TABLE: tuple[Parameter, ...] = (
    # --- identity (config.py)
    _p("myhostname", "", S, "The internet host name of this mail system (default: the FQDN of the machine)."),
    _p("mydomain", "", S, "The internet domain name of this mail system (default: $myhostname minus its first label)."),
    _p("myorigin", "$myhostname", S, "The domain that locally-posted mail appears to come from."),
    _p("mail_name", "relayagent", S, "The mail system name shown in the listener's greeting ($smtpd_banner) and in bounces (Postfix's default is Postfix)."),
    _p("compatibility_level", "3.6", S, "Postfix compatibility level; relayagent always behaves as Postfix 3.6+ does."),
    _p("mynetworks", "127.0.0.0/8 [::1]/128", L, "Networks whose clients may relay (Postfix computes its default from the interfaces; ours is loopback only)."),
    _p("inet_interfaces", "all", L, "The network interface addresses this mail system receives mail on (for MX self-detection)."),
    _p("proxy_interfaces", "", L, "Addresses this mail system receives mail on by way of a proxy or NAT (for MX self-detection)."),
    _p("inet_protocols", "all", L, "The address families to use: all, ipv4, ipv6.", choices=("all", "ipv4", "ipv6")),
    # --- spool (relayagent/spool)
    _p("queue_directory", "/var/spool/relayagent", S, "The spool directory; relative to the directory of main.cf when not absolute (ours differs from Postfix's /var/spool/postfix: the queues are not shared).", path=True),
    _p("message_size_limit", "10240000", N, "The largest message accepted, in bytes (0: no limit).", minimum=0),
    _p("hopcount_limit", "50", N, "The largest number of Received: headers before mail is bounced as looping.", minimum=1),
    _p("queue_minfree", "0", N, "The least free space, in bytes, the queue file system must have for new mail to be taken (every intake refuses below it, and below 1.5*$message_size_limit, as Postfix's SMTP server does).", minimum=0),
    # --- scheduler (relayagent/qmgr/scheduler.py)
    _p("queue_run_delay", "300s", T, "How often the deferred queue is scanned."),
    _p("minimal_backoff_time", "300s", T, "The least time between attempts to deliver a deferred message."),
    _p("maximal_backoff_time", "4000s", T, "The most time between attempts to deliver a deferred message."),
    _p("maximal_queue_lifetime", "5d", T, "How long a message may stay queued before it is bounced as undeliverable.", unit="d"),
    _p("bounce_queue_lifetime", "5d", T, "How long a bounce message may stay queued before it is dropped.", unit="d"),
    _p("delay_warning_time", "0h", T, "When to send a delay warning for mail still queued (0: never).", unit="h"),
    _p("qmgr_message_active_limit", "20000", N, "The most messages in the active queue.", minimum=1),
    _p("qmgr_message_recipient_limit", "20000", N, "The most recipients held in memory by the queue manager.", minimum=1),
    _p("default_destination_concurrency_limit", "20", N, "The default most parallel deliveries to one destination.", minimum=1),
    _p("default_destination_recipient_limit", "50", N, "The default most recipients per delivery request.", minimum=1),
    _p("default_destination_concurrency_failed_cohort_limit", "1", N, "The default number of failed cohorts after which a destination is throttled.", minimum=1),
    _p("default_destination_concurrency_negative_feedback", "1", S, "The default concurrency decrease after a failed delivery (a number or a ratio such as 1/concurrency)."),
    _p("default_destination_concurrency_positive_feedback", "1", S, "The default concurrency increase after a successful delivery (a number or a ratio such as 1/concurrency)."),
    _p("default_destination_rate_delay", "0s", T, "The default pause between deliveries to one destination."),
    _p("initial_destination_concurrency", "5", N, "The initial concurrency for a new destination.", minimum=1),
    _p("smtp_initial_destination_concurrency", "$initial_destination_concurrency", N, "The initial concurrency for a new destination of the smtp transport.", minimum=1),
    _p("smtp_destination_concurrency_limit", "$default_destination_concurrency_limit", N, "The most parallel deliveries to the same destination.", minimum=1),
    _p("smtp_destination_recipient_limit", "$default_destination_recipient_limit", N, "The most recipients per message delivery.", minimum=1),
    _p("smtp_destination_concurrency_failed_cohort_limit", "$default_destination_concurrency_failed_cohort_limit", N, "Failed cohorts after which a destination is marked dead.", minimum=1),
    _p("smtp_destination_concurrency_negative_feedback", "$default_destination_concurrency_negative_feedback", S, "Concurrency decrease after a failed delivery."),
    _p("smtp_destination_concurrency_positive_feedback", "$default_destination_concurrency_positive_feedback", S, "Concurrency increase after a successful delivery."),
    _p("smtp_destination_rate_delay", "$default_destination_rate_delay", T, "The pause between deliveries to the same destination."),
    # --- limits per destination key (relayagent/qmgr/limits.py, shared.py)
    _p("default_destination_rate_limit", "", S, "The default most messages per unit of time to one destination key, e.g. 100/m (also /s, /h, /d; empty: no limit).", ours=True),
    _p("smtp_destination_rate_limit", "$default_destination_rate_limit", S, "The most messages per unit of time to one destination key of the smtp transport, e.g. 100/m (empty: no limit).", ours=True),
    _p("default_connection_rate_limit", "", S, "The default most new connections per unit of time to one destination key, e.g. 10/s (empty: no limit).", ours=True),
    _p("smtp_connection_rate_limit", "$default_connection_rate_limit", S, "The most new connections per unit of time to one destination key of the smtp transport (empty: no limit).", ours=True),
    _p("smtp_destination_limit_key", "nexthop", S, "What the rate, concurrency and shaping limits are counted by: nexthop, domain (the recipient domain) or mx (the MX host set), then rolled up through smtp_destination_rollup_maps.", choices=("nexthop", "domain", "mx"), ours=True),
    _p("smtp_destination_rollup_maps", "", L, "Lookup tables from a nexthop, domain or MX host name (or its parent domain as .parent) to a shared limit key, e.g. .google.com -> google.", ours=True),
    _p("smtp_shaping_maps", "", L, "Shaping tables: lines [KEY] /REGEX/ ACTION [VALUE] DURATION matched on a server's 4xx/5xx reply (suspend, concurrency N or rate N/UNIT, for a time); builtin:providers names the table shipped for the big providers.", ours=True),
    _p("relayagent_redis", "", S, "The Redis server that shares the limits between nodes and workers: redis://host:port/db or unix:/path (empty: every process keeps its own share).", ours=True),
    _p("relayagent_redis_prefix", "relayagent:", S, "The prefix of every Redis key: the nodes naming the same prefix share their limits.", ours=True),
    _p("relayagent_redis_lease", "30s", T, "How long a concurrency slot held in Redis lasts unless renewed (renewed every third of it): a node that dies frees its slots within this time.", ours=True),
    _p("relayagent_redis_timeout", "1s", T, "How long a decision waits for Redis before this node falls back to its own share of the limits.", ours=True),
    _p("default_process_limit", "100", N, "The most deliveries in progress at once, over all destinations.", minimum=1),
    _p("soft_bounce", "no", B, "Safety net: turn every bounce into a deferral, and 5xx replies into 4xx."),
    # --- nexthop and addresses (relayagent/smtp/resolve.py)
    _p("relayhost", "", S, "The nexthop for non-local mail: [host]:port, host:port, or a domain (MX lookup)."),
    _p("transport_maps", "", L, "Lookup tables from recipient domain to transport:nexthop."),
    _p("default_transport", "smtp", S, "The transport for mail with no transport_maps entry; only smtp is served."),
    _p("fallback_relay", "", L, "Hosts to hand mail to when a destination is not found or unreachable."),
    _p("smtp_fallback_relay", "$fallback_relay", L, "Hosts to hand mail to when a destination is not found or unreachable."),
    _p("smtp_tcp_port", "smtp", S, "The default TCP port (a number or a service name)."),
    _p("best_mx_transport", "", S, "The transport to use when this machine is the best MX (empty: a mail loop is reported)."),
    _p("disable_dns_lookups", "no", B, "Disable DNS lookups: use the system resolver only."),
    _p("smtp_dns_support_level", "", S, "DNS use: empty (enabled), disabled, enabled, dnssec (ask for DNSSEC and trust the AD bit: the name server must be a local validating resolver; needed for DANE).", choices=("", "disabled", "enabled", "dnssec")),
    _p("smtp_host_lookup", "dns", L, "How to look up host addresses: dns, native.", choices=("dns", "native")),
    _p("ignore_mx_lookup_error", "no", B, "On a failed MX lookup, look up the A record instead of deferring."),
    _p("smtp_address_preference", "any", S, "The address family preferred within one MX preference.", choices=("any", "ipv4", "ipv6")),
    _p("smtp_randomize_addresses", "yes", B, "Randomize the order of equal-preference MX host addresses."),
    _p("smtp_mx_address_limit", "5", N, "The most MX addresses to try for one nexthop (0: no limit).", minimum=0),
    _p("smtp_mx_session_limit", "2", N, "The most sessions per delivery that get past the greeting (0: no limit).", minimum=0),
    _p("dns_nameservers", "", L, "Name servers to query, host[:port] each; empty means the system resolver's (/etc/resolv.conf).", ours=True),
    _p("smtp_defer_if_no_mx_address_found", "no", B, "Defer rather than bounce when no MX host has an address."),
    # --- connection (relayagent/smtp/connect.py)
    _p("smtp_connect_timeout", "30s", T, "Timeout for completing a TCP connection."),
    _p("smtp_bind_address", "", S, "Numerical IPv4 source address for outgoing connections."),
    _p("smtp_bind_address6", "", S, "Numerical IPv6 source address for outgoing connections."),
    _p("smtp_skip_4xx_greeting", "yes", B, "Skip servers that greet with 4xx (fixed to yes in Postfix since 2.1; kept for old main.cf files).", ours=True),
    _p("smtp_skip_5xx_greeting", "yes", B, "Skip servers that greet with 5xx."),
    _p("smtp_connection_attempt_delay", "0.25s", T, "Head start of one address family over the other within one MX preference (RFC 8305).", ours=True),
    _p("smtp_connection_cache_destinations", "", L, "Destinations whose connections are always cached."),
    _p("smtp_connection_cache_on_demand", "yes", B, "Cache connections to destinations with a backlog."),
    _p("smtp_connection_cache_time_limit", "2s", T, "How long an idle cached connection is kept."),
    _p("smtp_connection_reuse_time_limit", "300s", T, "How long a connection may be reused."),
    _p("smtp_connection_reuse_count_limit", "0", N, "How many times a connection may be reused (0: no limit).", minimum=0),
    # --- session (relayagent/smtp/session.py)
    _p("smtp_helo_name", "$myhostname", S, "The host name sent with HELO and EHLO."),
    _p("smtp_always_send_ehlo", "yes", B, "Always send EHLO at the start of a connection."),
    _p("smtp_never_send_ehlo", "no", B, "Never send EHLO at the start of a connection."),
    _p("smtp_helo_timeout", "300s", T, "Timeout for the greeting and for HELO/EHLO."),
    _p("smtp_mail_timeout", "300s", T, "Timeout for MAIL FROM."),
    _p("smtp_rcpt_timeout", "300s", T, "Timeout for RCPT TO."),
    _p("smtp_data_init_timeout", "120s", T, "Timeout for DATA."),
    _p("smtp_data_xfer_timeout", "180s", T, "Timeout for sending the message content."),
    _p("smtp_data_done_timeout", "600s", T, "Timeout for the final \".\"; on expiry the mail may be delivered twice."),
    _p("smtp_rset_timeout", "20s", T, "Timeout for RSET."),
    _p("smtp_quit_timeout", "300s", T, "Timeout for QUIT."),
    _p("smtp_starttls_timeout", "300s", T, "Timeout for the STARTTLS handshake."),
    _p("smtp_line_length_limit", "998", N, "Content lines longer than this are broken with CRLF SPACE (0: no limit).", minimum=0),
    _p("smtp_pix_workarounds", "disable_esmtp, delay_dotcrlf", L, "Workarounds for the CISCO PIX firewall.", choices=("disable_esmtp", "delay_dotcrlf")),
    _p("smtp_pix_workaround_delay_time", "10s", T, "Pause before sending .CRLF, for the PIX bug."),
    _p("smtp_pix_workaround_threshold_time", "500s", T, "How long mail must be queued before the PIX .CRLF workaround is used."),
    _p("smtp_skip_quit_response", "yes", B, "Do not wait for the reply to QUIT."),
    _p("smtputf8_enable", "yes", B, "Support SMTPUTF8 (RFC 6531)."),
    # --- MIME (relayagent/smtp/mime.py)
    _p("disable_mime_output_conversion", "no", B, "Do not convert 8BITMIME to 7BIT when the server lacks 8BITMIME."),
    _p("mime_nesting_limit", "100", N, "The deepest MIME nesting handled when converting to 7bit.", minimum=1),
    _p("mime_boundary_length_limit", "2048", N, "The most characters of a MIME boundary used for matching.", minimum=1),
    # --- SASL (relayagent/smtp/sasl.py)
    _p("smtp_sasl_auth_enable", "no", B, "Enable SASL authentication in the SMTP client."),
    _p("smtp_sasl_password_maps", "", L, "Lookup tables from remote host or nexthop to username:password."),
    _p("smtp_sasl_mechanism_filter", "", L, "If non-empty, the mechanisms the client may use."),
    _p("smtp_sasl_security_options", "noplaintext, noanonymous", L, "SASL restrictions without TLS.", choices=("noplaintext", "noactive", "nodictionary", "noanonymous", "mutual_auth")),
    _p("smtp_sasl_tls_security_options", "$smtp_sasl_security_options", L, "SASL restrictions over TLS.", choices=("noplaintext", "noactive", "nodictionary", "noanonymous", "mutual_auth")),
    _p("smtp_sasl_auth_soft_bounce", "yes", B, "Treat a 5xx AUTH failure as temporary."),
    # --- TLS (relayagent/smtp/tls.py)
    _p("smtp_tls_security_level", "", S, "The default TLS security level: none, may, encrypt, dane, dane-only, verify, secure (empty: none).", choices=_TLS_LEVELS),
    _p("smtp_tls_policy_maps", "", L, "Per-nexthop TLS policy lookup tables."),
    _p("smtp_tls_dane_insecure_mx_policy", "dane", S, "Level dane, MX found by an insecure MX lookup, host with secure TLSA records: may (ignore them), encrypt (TLS, no authentication) or dane (enforce them, logged as Trusted). Postfix writes the default as an expression that yields dane at level dane, the only level it is used at.", choices=("may", "encrypt", "dane")),
    _p("smtp_tls_CAfile", "", S, "File of trusted CA certificates (PEM).", path=True),
    _p("smtp_tls_CApath", "", S, "Directory of trusted CA certificates (PEM).", path=True),
    _p("smtp_tls_cert_file", "", S, "Client certificate (PEM).", path=True),
    _p("smtp_tls_key_file", "$smtp_tls_cert_file", S, "Client private key (PEM).", path=True),
    # RFC 8996 deprecates TLS 1.0 and 1.1; Postfix 3.7's default is >=TLSv1.
    _p("smtp_tls_protocols", ">=TLSv1.2", L, "TLS protocols allowed at opportunistic levels (ours refuses TLS 1.0/1.1 per RFC 8996)."),
    _p("smtp_tls_mandatory_protocols", ">=TLSv1.2", L, "TLS protocols allowed at mandatory levels (ours refuses TLS 1.0/1.1 per RFC 8996)."),
    _p("smtp_tls_ciphers", "medium", S, "Cipher grade at opportunistic levels.", choices=("export", "low", "medium", "high", "null")),
    _p("smtp_tls_mandatory_ciphers", "medium", S, "Cipher grade at mandatory levels.", choices=("export", "low", "medium", "high", "null")),
    _p("smtp_tls_verify_cert_match", "hostname", L, "Names a certificate must match at level verify."),
    _p("smtp_tls_secure_cert_match", "nexthop, dot-nexthop", L, "Names a certificate must match at level secure."),
    _p("smtp_tls_loglevel", "0", N, "TLS logging verbosity (1: one line per session).", minimum=0),
    # --- MTA-STS (relayagent/smtp/mtasts.py) and TLSRPT (relayagent/smtp/tlsrpt.py)
    _p("smtp_mta_sts_enable", "no", B, "Look up and apply recipient domains' MTA-STS policies (RFC 8461): TXT _mta-sts.<domain>, then an HTTPS fetch.", ours=True),
    _p("smtp_mta_sts_cache_directory", "mta-sts", S, "Where MTA-STS policies are kept across restarts, relative to queue_directory when not absolute.", ours=True),
    _p("smtp_mta_sts_fetch_timeout", "10s", T, "Time limit for fetching one MTA-STS policy over HTTPS.", minimum=1, ours=True),
    _p("smtp_mta_sts_max_policy_size", "65536", N, "The largest MTA-STS policy file fetched, in bytes.", minimum=512, ours=True),
    _p("smtp_mta_sts_CAfile", "", S, "CA certificates (PEM) that MTA-STS policy servers are verified against (empty: the system trust store).", path=True, ours=True),
    _p("smtp_mta_sts_refresh_margin", "1d", T, "Fetch a cached MTA-STS policy again in the background when it expires within this time.", unit="s", minimum=0, ours=True),
    _p("smtp_tlsrpt_enable", "no", B, "Count TLS outcomes per policy domain and send RFC 8460 TLSRPT aggregate reports to the rua of _smtp._tls.<domain>.", ours=True),
    _p("smtp_tlsrpt_interval", "1d", T, "The TLSRPT report period (periods are aligned to multiples of it in UTC).", minimum=3600, ours=True),
    _p("smtp_tlsrpt_organization", "$mydomain", S, "The organization-name of TLSRPT reports.", ours=True),
    _p("smtp_tlsrpt_contact", "postmaster@$mydomain", S, "The contact-info of TLSRPT reports and the sender of mailto: reports.", ours=True),
    # --- REQUIRETLS and TLS-Required (RFC 8689; relayagent/smtp/requiretls.py)
    _p("requiretls_enable", "yes", B, "Support REQUIRETLS (RFC 8689): the listener offers it over TLS, sendmail -O requiretls=yes asks for it, and delivery enforces it."),
    _p("tls_required_enable", "yes", B, "Honour a \"TLS-Required: No\" header (RFC 8689) in a message without REQUIRETLS: a mandatory TLS level becomes may for its delivery."),
    _p("smtp_requiretls_policy", "enforce", L, "How REQUIRETLS is enforced per nexthop domain: actions (enforce, opportunistic+starttls, opportunistic, disable, error) and type:table lookups answering one, tried in order; no match: enforce (Postfix's default also makes $mydomain, localhost and IP addresses opportunistic)."),
    _p("requiretls_redact_dsn", "yes", B, "A delivery status notice of a REQUIRETLS message returns its header only, and is not itself sent with REQUIRETLS (RFC 8689 section 5)."),
    # --- bounces and notices (relayagent/bounce/dsn.py)
    _p("double_bounce_sender", "double-bounce", S, "The sender of postmaster notices of undeliverable bounces."),
    _p("notify_classes", "resource, software", L, "Problem classes reported to the postmaster.", choices=("bounce", "2bounce", "data", "delay", "policy", "protocol", "resource", "software")),
    _p("error_notice_recipient", "postmaster", S, "Recipient of protocol, resource and software error notices."),
    _p("bounce_notice_recipient", "postmaster", S, "Recipient of bounce notices (notify_classes bounce)."),
    _p("2bounce_notice_recipient", "postmaster", S, "Recipient of undeliverable bounces."),
    _p("delay_notice_recipient", "postmaster", S, "Recipient of delay notices (notify_classes delay)."),
    _p("bounce_size_limit", "50000", N, "The most octets of the original message returned in a bounce.", minimum=0),
    # --- logging (relayagent/common/maillog.py)
    _p("debug_peer_list", "", L, "Hosts or networks whose sessions are logged verbosely."),
    _p("debug_peer_level", "2", N, "Verbosity increment for debug_peer_list matches.", minimum=0),
    _p("delay_logging_resolution_limit", "2", N, "The most digits after the decimal point of delay= and delays= in log lines (0-6).", minimum=0),
    _p("syslog_name", "relayagent", S, "The program name prefix in log lines (Postfix's is postfix).", ours=True),
    _p("syslog_facility", "mail", S, "The syslog facility of the lines sent to syslog (twistd --syslog).", choices=("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7")),
    _p("log_format", "postfix", S, "The log format: postfix (syslog-style lines) or json (one object per line).", choices=("postfix", "json"), ours=True),
    _p("maillog_file", "", S, "relayagent's log lines (only those), in log_format, go to this file instead of twistd's log (empty: into twistd's log: --logfile, standard output with -n, or --logger).", path=True),
    # --- the listener (relayagent/smtpd/twistedmail.py)
    _p("smtpd_endpoints", "", L, "Twisted server endpoint strings to accept mail on, e.g. tcp:10587:interface=127.0.0.1 (empty: no listener).", ours=True),
    _p("smtpd_banner", "$myhostname ESMTP $mail_name", S, "The text after 220 in the listener's greeting."),
    _p("smtpd_sasl_auth_enable", "no", B, "Offer SASL AUTH in the listener (CRAM-MD5; PLAIN and LOGIN too after STARTTLS); authenticated clients may relay."),
    _p("smtpd_sasl_password_maps", "", L, "The listener's SASL accounts: lookup tables from username to password (keep them readable by the daemon only).", ours=True),
    # --- the listener's TLS (relayagent/smtpd/tls.py)
    _p("smtpd_tls_security_level", "", S, "The listener's TLS level: none (empty), may (offer STARTTLS) or encrypt (require STARTTLS before MAIL, AUTH only after it).", choices=("", "none", "may", "encrypt")),
    _p("smtpd_tls_cert_file", "", S, "The listener's server certificate, then its chain (PEM).", path=True),
    _p("smtpd_tls_key_file", "$smtpd_tls_cert_file", S, "The listener's private key (unencrypted PEM).", path=True),
    _p("smtpd_tls_CAfile", "", S, "CA certificates (PEM) that make a client certificate Trusted, and whose names the certificate request sends.", path=True),
    _p("smtpd_tls_ask_ccert", "no", B, "Ask a TLS client for a certificate (never required)."),
    _p("smtpd_tls_auth_only", "no", B, "Offer AUTH only after STARTTLS (implied at level encrypt)."),
    _p("smtpd_tls_protocols", ">=TLSv1.2", L, "TLS protocols the listener accepts (ours refuses TLS 1.0/1.1 per RFC 8996)."),
    _p("smtpd_tls_fingerprint_digest", "sha256", S, "The digest of client certificate fingerprints in relay_clientcerts (Postfix writes the default as a compatibility_level expression; sha256 is what it yields at level 3.6).", choices=("sha256", "sha384", "sha512", "sha1", "md5")),
    _p("relay_clientcerts", "", L, "Lookup tables whose keys are the fingerprints of client certificates (or their public keys) that may relay, as permit_tls_clientcerts."),
    # --- worker processes (relayagent/master/worker.py)
    _p("relayagent_stop_timeout", "30s", T, "How long a stop (SIGTERM, Ctrl-C) waits for the deliveries in flight before it stops anyway (they stay queued); a second signal stops at once.", ours=True),
    _p("relayagent_workers", "auto", N, "Worker processes sharing the queue, each on its own core: auto (one per CPU this process may run on) or a number (1: one process, no workers); each owns the queue files whose id maps to it and gets 1/N of the queue manager's limits.", minimum=1, choices=("auto",), ours=True),
    # --- metrics (relayagent/master/metrics.py)
    _p("metrics_endpoints", "", L, "Twisted server endpoint strings for the Prometheus metrics (GET /metrics), e.g. tcp:9154:interface=127.0.0.1 (empty: no metrics, at no cost).", ours=True),
    _p("metrics_nexthops", "", L, "Nexthops (as the queue manager names them: [mx.example]:25, example.com) that get their own nexthop label in the metrics, besides those of relayhost; every other is counted as other.", ours=True),
)

PARAMETERS: Mapping[str, Parameter] = {p.name: p for p in _TABLE}

# ---------------------------------------------------------------------------
# Parsing main.cf


@dataclass(frozen=True)
class Setting:
    """A ``name = value`` line of a main.cf file."""

    name: str
    value: str
    filename: str
    line: int

    def where(self) -> str:
        """``FILENAME, line N``: where the setting was written, for messages."""
        return f"{self.filename}, line {self.line}"


_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


def parse_main_cf(text: str, filename: str = "main.cf") -> tuple[list[Setting], list[str]]:
    """Parse main.cf text into settings, in file order, and syntax warnings.

    Raises ConfigError for lines that are not ``name = value``.
    """
    settings: list[Setting] = []
    warnings: list[str] = []
    logical: list[str] = []
    start_line = 0

    def finish() -> None:
        if not logical:
            return
        joined = " ".join(part.strip() for part in logical)
        logical.clear()
        name, sep, value = joined.partition("=")
        name = name.strip()
        if not sep or not _NAME_RE.match(name):
            raise ConfigError(
                f"{filename}, line {start_line}: syntax error: expected 'name = value', "
                f"got {joined[:60]!r}"
            )
        settings.append(Setting(name, value.strip(), filename, start_line))

    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.rstrip()
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            # Blank and comment lines end nothing in Postfix: a continuation
            # may follow a comment.  They are simply skipped.
            continue
        if line[0].isspace():
            if not logical:
                raise ConfigError(
                    f"{filename}, line {number}: syntax error: continuation line "
                    "with no parameter before it"
                )
            logical.append(stripped)
            continue
        finish()
        logical.append(stripped)
        start_line = number
    finish()
    return settings, warnings


# ---------------------------------------------------------------------------
# Expansion

_BARE_NAME_RE = re.compile(r"[A-Za-z0-9_]+")

_MAX_EXPANSION_DEPTH = 100


@functools.lru_cache(maxsize=1)
def _default_hostname() -> str:
    # getfqdn() may ask the resolver: do it once per process.
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    if "." not in name:
        name += ".localdomain"
    return name.lower()


# ---------------------------------------------------------------------------
# Typed values

_TIME_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LIST_SPLIT_RE = re.compile(r"[\s,]+")


def split_list(value: str) -> tuple[str, ...]:
    """Split a Postfix list value at commas and white space.

    Braces group: ``inline:{ a=b, c=d }`` stays one item, as in Postfix.
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        if depth == 0 and (char.isspace() or char == ","):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        items.append("".join(current))
    return tuple(items)


def parse_time(text: str, unit: str = "s") -> float:
    """Parse a Postfix time value into seconds; raises ValueError."""
    match = _TIME_RE.match(text.strip())
    if not match:
        raise ValueError(text)
    number, suffix = match.groups()
    return float(number) * _UNIT_SECONDS[(suffix or unit).lower()]


def convert(param: Parameter, value: str) -> Any:
    """Convert an expanded value to the parameter's type; raises ValueError."""
    if param.kind is Kind.BOOL:
        lowered = value.strip().lower()
        if lowered in ("yes", "true", "on", "1"):
            return True
        if lowered in ("no", "false", "off", "0"):
            return False
        raise ValueError(value)
    if param.kind is Kind.INT:
        if param.choices and value.strip().lower() in param.choices:
            return value.strip().lower()  # a word instead of a number (relayagent_workers = auto)
        number = int(value.strip())
        if param.minimum is not None and number < param.minimum:
            raise ValueError(value)
        return number
    if param.kind is Kind.TIME:
        seconds = parse_time(value, param.unit)
        if param.minimum is not None and seconds < param.minimum:
            raise ValueError(value)
        return seconds
    if param.kind is Kind.LIST:
        items = split_list(value)
        if param.choices:
            for item in items:
                if item.lower() not in param.choices:
                    raise ValueError(item)
            items = tuple(item.lower() for item in items)
        return items
    text = value.strip()
    if param.choices and text.lower() not in param.choices:
        raise ValueError(text)
    return text.lower() if param.choices else text


def _check_network(item: str) -> None:
    """mynetworks items: CIDR, an address, or [IPv6]/len."""
    bare = item
    if bare.startswith("["):
        close = bare.find("]")
        if close < 0:
            raise ValueError(item)
        bare = bare[1:close] + bare[close + 1:]
    # strict: host bits set (192.168.1.5/0) is a typo that would relay for
    # far more than meant; Postfix refuses it too.
    ipaddress.ip_network(bare, strict=True)


# Extra checks for a few parameters whose form is more than their type.
_VALIDATORS = {
    "mynetworks": lambda items: [_check_network(i) for i in items],
}


class Config:
    """An immutable, validated configuration.

    ``config["name"]`` and ``config.name`` give the typed value (bool, int,
    float seconds, tuple of str, or str, with ``$name`` expanded).
    """

    def __init__(
        self,
        settings: Mapping[str, str] | Iterable[Setting] | None = None,
        *,
        path: str | None = None,
        base_dir: str | None = None,
        warnings: Iterable[str] = (),
    ) -> None:
        self._settings: dict[str, Setting] = {}
        if isinstance(settings, Mapping):
            for name, value in settings.items():
                self._settings[name] = Setting(name, str(value), "<override>", 0)
        elif settings is not None:
            for setting in settings:
                self._settings[setting.name] = setting
        self.path = path
        self.base_dir = base_dir if base_dir is not None else (
            os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
        )
        self.warnings: list[str] = list(warnings)
        for name, setting in self._settings.items():
            if name not in PARAMETERS:
                from relayagent.common.postfix_parameters import is_postfix_parameter

                # A copied Postfix main.cf holds Postfix's other parameters.
                what = "Postfix parameter not used by relayagent" if is_postfix_parameter(name) else "unknown parameter"
                self.warnings.append(f"{setting.where()}: {what}: {name}")
        self._values: dict[str, Any] = {}
        self._validate()
        self._check_queue_minfree()
        self.warnings = list(dict.fromkeys(self.warnings))

    # -- construction

    @classmethod
    def defaults(cls) -> Config:
        """A Config with no main.cf: every parameter at its default."""
        return cls()

    @classmethod
    def from_text(cls, text: str, filename: str = "main.cf", *, base_dir: str | None = None) -> Config:
        """A Config from main.cf text; ``filename`` names it in warnings and
        errors.  Relative paths resolve against ``base_dir`` (default: the
        current directory).  Raises ConfigError for a syntax error or a bad
        value."""
        settings, warnings = parse_main_cf(text, filename)
        return cls(settings, path=None, base_dir=base_dir, warnings=warnings)

    @classmethod
    def load(cls, path: str) -> Config:
        """A Config read from the main.cf file ``path``; its relative paths
        resolve against the file's directory.  Raises ConfigError when the
        file cannot be read, is not UTF-8, or holds a syntax error or a bad
        value."""
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at octet {exc.start})") from None
        settings, warnings = parse_main_cf(text, path)
        return cls(settings, path=path, warnings=warnings)

    def replace(self, **overrides: Any) -> Config:
        """A new Config with some parameters set (values as main.cf text)."""
        settings = dict(self._settings)
        for name, value in overrides.items():
            if isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            settings[name] = Setting(name, str(value), "<override>", 0)
        return Config(settings.values(), path=self.path, base_dir=self.base_dir)

    # -- access

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"unknown parameter: {name}") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"unknown parameter: {name}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def raw(self, name: str) -> str:
        """The expanded text of a parameter, before typing."""
        return self._expand_name(name, 0)

    def unexpanded(self, name: str) -> str:
        """The value as written in main.cf, or the default, unexpanded."""
        setting = self._settings.get(name)
        if setting is not None:
            return setting.value
        return self._default_text(name)

    def is_set(self, name: str) -> bool:
        """Whether main.cf (or an override) sets the parameter."""
        return name in self._settings

    def setting(self, name: str) -> Setting | None:
        """The main.cf line (or override) that sets the parameter, or None when
        it keeps its default."""
        return self._settings.get(name)

    def path_of(self, name: str) -> str:
        """A path-valued parameter resolved against ``base_dir``."""
        value = self[name]
        if not value:
            return value
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def resolve_path(self, value: str) -> str:
        """Resolve a file name written in the configuration."""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def names(self) -> Iterator[str]:
        """Every parameter name, in the order of the parameter table."""
        return iter(PARAMETERS)

    # -- internals

    def _default_text(self, name: str, depth: int = 0) -> str:
        if name == "myhostname":
            return _default_hostname()
        if name == "mydomain":
            # At the caller's depth: "myhostname = mail.$mydomain" loops
            # through here and must meet the recursion check.
            host = self._expand_name("myhostname", depth)
            _, dot, rest = host.partition(".")
            return rest if dot and "." in rest else (rest or "localdomain")
        return PARAMETERS[name].default

    def _expand_name(self, name: str, depth: int) -> str:
        if name in self._settings:
            text = self._settings[name].value
        elif name in PARAMETERS:
            text = self._default_text(name, depth + 1)
        else:
            return ""
        return self._expand(text, depth + 1, name)

    def _expand(self, text: str, depth: int, owner: str) -> str:
        """Expand ``$name``, ``${name}``, ``$(name)``, ``$$`` and Postfix 3's
        conditionals ``${name?value}``, ``${name:value}`` (each value
        optionally in braces) and ``${name?{value1}:{value2}}``."""
        if "$" not in text:
            return text
        if depth > _MAX_EXPANSION_DEPTH:
            raise ConfigError(
                f"{self._where(owner)}: parameter {owner}: recursive $name expansion "
                "(a parameter refers to itself)"
            )
        out: list[str] = []
        position = 0
        while True:
            dollar = text.find("$", position)
            if dollar < 0:
                out.append(text[position:])
                return "".join(out)
            out.append(text[position:dollar])
            position = self._expand_one(text, dollar, depth, owner, out)

    def _expand_one(self, text: str, dollar: int, depth: int, owner: str, out: list[str]) -> int:
        """Expand the reference at ``text[dollar]``; return where to go on."""
        following = text[dollar + 1:dollar + 2]
        if following == "$":
            out.append("$")
            return dollar + 2
        if following == "(":
            close = text.find(")", dollar)
            name = text[dollar + 2:close] if close > 0 else ""
            if not _NAME_RE.match(name):
                raise self._syntax_error(owner, text, "bad $(name)")
            out.append(self._reference(name, depth, owner))
            return close + 1
        if following != "{":
            match = _BARE_NAME_RE.match(text, dollar + 1)
            if match is None:
                out.append("$")  # a lone "$" stands for itself
                return dollar + 1
            out.append(self._reference(match.group(0), depth, owner))
            return match.end()
        match = _BARE_NAME_RE.match(text, dollar + 2)
        if match is None:
            raise self._syntax_error(owner, text, "expected a parameter name after '${'")
        name, position = match.group(0), match.end()
        operator = text[position:position + 1]
        if operator == "}":
            out.append(self._reference(name, depth, owner))
            return position + 1
        if operator not in ("?", ":"):
            raise self._syntax_error(owner, text, f"unexpected {operator or 'end'!r} in ${{{name}...}}")
        when_set, position = self._conditional_value(text, position + 1, owner)
        when_empty = None
        if operator == "?" and text.startswith(":{", position):
            when_empty, position = self._conditional_value(text, position + 1, owner)
        if text[position:position + 1] != "}":
            raise self._syntax_error(owner, text, f"missing '}}' after ${{{name}{operator}...")
        is_set = bool(self._expand_name(name, depth))
        if operator == ":":
            chosen = None if is_set else when_set
        else:
            chosen = when_set if is_set else when_empty
        if chosen:
            out.append(self._expand(chosen, depth + 1, owner))
        return position + 1

    def _conditional_value(self, text: str, position: int, owner: str) -> tuple[str, int]:
        """The value of a conditional: ``{balanced text}``, or plain text
        up to the closing brace.  Returns it and the position after it."""
        if text.startswith("{", position):
            level = 0
            for index in range(position, len(text)):
                if text[index] == "{":
                    level += 1
                elif text[index] == "}":
                    level -= 1
                    if level == 0:
                        return text[position + 1:index], index + 1
            raise self._syntax_error(owner, text, "missing '}'")
        close = text.find("}", position)
        if close < 0:
            raise self._syntax_error(owner, text, "missing '}'")
        return text[position:close], close

    def _reference(self, name: str, depth: int, owner: str) -> str:
        if name not in PARAMETERS and name not in self._settings:
            self.warnings.append(
                f"{self._where(owner)}: parameter {owner}: undefined parameter ${name} expands to nothing"
            )
        return self._expand_name(name, depth)

    def _syntax_error(self, owner: str, text: str, what: str) -> ConfigError:
        return ConfigError(f"{self._where(owner)}: parameter {owner}: {what} in {text!r}")

    def _where(self, name: str) -> str:
        setting = self._settings.get(name)
        if setting is None or setting.line == 0:
            return setting.filename if setting else "default"
        return setting.where()

    def _check_queue_minfree(self) -> None:
        # Postfix's smtpd warns the same way at start-up: a queue_minfree
        # below 1.5 messages of the largest size refuses nothing the
        # 1.5*message_size_limit rule does not already refuse.
        minfree, limit = self._values["queue_minfree"], self._values["message_size_limit"]
        if minfree and limit and minfree / 1.5 < limit:
            self.warnings.append(
                f"{self._where('queue_minfree')}: queue_minfree({minfree}) should be at least "
                f"1.5*message_size_limit({limit})"
            )

    def _validate(self) -> None:
        errors: list[str] = []
        for name, param in PARAMETERS.items():
            try:
                text = self._expand_name(name, 0)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            try:
                value = convert(param, text)
                if name in _VALIDATORS:
                    _VALIDATORS[name](value)
            except ValueError:
                errors.append(
                    f"{self._where(name)}: parameter {name}: bad value {text!r}: "
                    f"expected {param.expected_form()}"
                )
                continue
            self._values[name] = value
        if errors:
            raise ConfigError("\n".join(errors))


# ---------------------------------------------------------------------------
# Settings bound once


# The field of a settings object that is no parameter: the directory
# relative file names in tables resolve against (main.cf's).
BASE_DIR = "base_dir"
_PARAMETER = "parameter"


def parameter(name: str) -> Any:
    """A settings field for a parameter whose name is no Python name
    (``2bounce_notice_recipient``)."""
    return field(metadata={_PARAMETER: name})


def _parameter_of(item: Any) -> str:
    name: str = item.metadata.get(_PARAMETER, item.name)
    return name


@dataclass(frozen=True, slots=True)
class Settings:
    """A phase's parameters, bound once at start-up (as Postfix's
    ``smtp_params.c`` binds its variables): a frozen dataclass whose
    fields are named after the parameters they hold, typed as the table
    types them (path parameters resolved against main.cf's directory).
    A field named ``base_dir`` gets that directory.

    A phase subclasses it with the parameters it reads and nothing else;
    tests/test_parameters.py holds the union of every subclass's fields
    against the table.  ``from_config`` is the only reader of ``Config``
    by name: a field that is not a parameter fails there (``KeyError``),
    at start-up rather than at the first message.
    """

    @classmethod
    def from_config(cls, config: Config, **given: Any) -> Self:
        """Bind every field from ``config``; ``given`` sets fields
        directly (tests; a value the caller already parsed)."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            name = _parameter_of(item)
            if item.name in given:
                values[item.name] = given[item.name]
            elif item.name == BASE_DIR:
                values[item.name] = config.base_dir
            elif PARAMETERS[name].path:
                values[item.name] = config.path_of(name)
            else:
                values[item.name] = config[name]
        return cls(**values)


def parameters_of(settings: type[Settings]) -> frozenset[str]:
    """The parameters a settings class binds."""
    return frozenset(_parameter_of(item) for item in fields(settings) if item.name != BASE_DIR)


# ---------------------------------------------------------------------------
# postconf


def postconf_lines(config: Config, mode: str = "effective", names: Iterable[str] = ()) -> list[str]:
    """``name = value`` lines as postconf(1) prints them.

    ``mode``: "effective" (every parameter, as it takes effect but
    unexpanded, like postconf), "non_default" (-n: only those set in the
    file) or "defaults" (-d).  Unknown names raise KeyError.
    """
    selected = list(names) or sorted(PARAMETERS)
    lines = []
    for name in selected:
        if name not in PARAMETERS:
            raise KeyError(name)
        if mode == "non_default" and not config.is_set(name):
            continue
        if mode == "defaults":
            value = config._default_text(name)
        else:
            value = config.unexpanded(name)
        lines.append(f"{name} = {value}".rstrip() if value else f"{name} =")
    return lines
