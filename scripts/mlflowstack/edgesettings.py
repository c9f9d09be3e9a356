"""PUBLIC_PATH and TRUSTED_PROXIES, checked by ``stackctl config check`` before nginx starts.

nginx's entrypoint (nginx/docker-entrypoint.sh) refuses the same values at start with the same
rules, in shell; this is the stricter, exact check (Python's ``ipaddress``) an operator runs
first. Both values are written into nginx's configuration, so whatever these functions accept
is literal there: a location prefix and a regex (PUBLIC_PATH), ``set_real_ip_from`` lines
(TRUSTED_PROXIES).
"""

import ipaddress
import re

from mlflowstack.files import BundleError

_SEGMENTS = re.compile(r"(?:/[A-Za-z0-9._~-]+){1,16}")
MAX_PUBLIC_PATH = 200
# What nginx's set_real_ip_from and the entrypoint's check take: no netmask form, no IPv6 zone.
_CIDR_SHAPE = re.compile(r"[0-9A-Fa-f:.]+(?:/[0-9]{1,3})?")


def public_path_problem(value: str) -> str | None:
    """Why ``value`` cannot be PUBLIC_PATH, or None. Empty (the root) is fine.

    One leading ``/``, no trailing ``/``, segments of ``A-Z a-z 0-9 . _ ~ -`` (nothing nginx
    or a regex would read as syntax), no ``.`` or ``..`` segment (a client's path with one is
    resolved by nginx before it is matched, so such a prefix could never match), and not
    ``/_...``: nginx's internal locations (``/_auth``, ``/_artifact_files/``) start so, and
    the prefix must never shadow them.
    """
    if value == "":
        return None
    shown = ascii(value[:80])
    if len(value) > MAX_PUBLIC_PATH or not _SEGMENTS.fullmatch(value):
        return (
            f"PUBLIC_PATH: {shown} is not a path such as /mlflow (one leading /, no trailing /, "
            "segments of A-Z a-z 0-9 . _ ~ -)"
        )
    if any(segment in (".", "..") for segment in value.split("/")):
        return f"PUBLIC_PATH: {shown} has a . or .. segment"
    if value.startswith("/_"):
        return f"PUBLIC_PATH: {shown} starts with /_, which nginx's internal locations use"
    return None


# A proxy network wider than these would believe X-Forwarded-For from anyone (0.0.0.0/0).
MIN_PREFIX = {4: 8, 6: 8}


def trusted_proxies(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of TRUSTED_PROXIES (comma- or space-separated addresses or CIDRs).

    Raises BundleError naming the first entry that is not one, or that has host bits set
    (``10.0.0.1/8`` is ambiguous: meant the host, or the network?).
    """
    networks = []
    for entry in value.replace(",", " ").split():
        shown = ascii(entry[:80])
        if not _CIDR_SHAPE.fullmatch(entry):
            raise BundleError(f"TRUSTED_PROXIES: {shown} is not an address or CIDR (10.0.0.0/8)")
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as error:
            raise BundleError(f"TRUSTED_PROXIES: {shown}: {error}") from None
        if network.prefixlen < MIN_PREFIX[network.version]:
            raise BundleError(
                f"TRUSTED_PROXIES: {shown} trusts too much of the Internet (shortest: "
                f"/{MIN_PREFIX[4]} for IPv4, /{MIN_PREFIX[6]} for IPv6): anyone could then "
                "choose the address the login throttling sees"
            )
        networks.append(network)
    return networks


def check(settings: dict[str, str]) -> None:
    """Raise BundleError (one line) when PUBLIC_PATH or TRUSTED_PROXIES of nginx's
    environment ``settings`` is not acceptable."""
    problem = public_path_problem(settings.get("PUBLIC_PATH", ""))
    if problem:
        raise BundleError(problem)
    trusted_proxies(settings.get("TRUSTED_PROXIES", ""))
