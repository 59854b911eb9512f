"""The governance boundary: an Envoy egress gateway outside the sandbox, shared by both tiers.

Entry points (everything else in the package is how they work):

``parse_policy(raw) -> EgressPolicy``
    Validate ``egress:`` entries by name (host, port, methods, paths, credential). Refusals are
    ``UsageError`` with an ``egress-*`` code (exit 64). ``EgressPolicy.generation`` is its digest.
``EgressCA.ensure(dir)`` / ``ca.leaf(host)`` / ``ca.bundle()``
    The per-host egress CA (key 0600, root-only), a leaf per listed name, and the trust bundle a
    sandbox gets (system store + CA; point ``SSL_CERT_FILE`` etc. at it).
``render.render(GatewaySpec) -> Rendered`` (the module ``boundary.render``)
    Pure: ``Listener`` (identity, address, policy, optional netns) per profile or job, plus file
    paths, to the Envoy bootstrap, LDS, CDS and SDS documents (``documents(rendered)``).
``Gateway(root, netns=None)``
    One gateway process: ``put_secret`` (0600, rotation without restart), ``start(spec)``,
    ``apply(spec)`` (hot reload proven in force via admin, or ``gateway-reload-rejected`` with
    the last good generation kept), ``launch()`` (restart on the files), ``in_force()``
    (read from Envoy's admin socket, never from a file), ``stop()``, ``kill()``.
``events.read(access_log, identity=...)`` / ``events.summary(...)``
    ``egress.allowed`` / ``egress.denied`` audit events from the gateway's JSON access log.

``classify.classify(body) -> Verdict`` / ``python3 -m controlplane.boundary.classifyd``
    The reference content classifier and its ext_authz HTTP service; ``contentgate`` renders
    the gateway side for ``inspect: true`` names (the ceiling enforced by Envoy routes).

``envoy.binary()`` gives the pinned Envoy's path, version and sha256 (what receipts record).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane._internal.lazy import exports

# the policy model is light (job specs import it); the rest loads on first use, so importing a
# job spec does not pull in cryptography and the Envoy wrapper (`avm --help` stays fast). The
# modules envoy, events and render import as submodules: `from controlplane.boundary import envoy`.
from controlplane.boundary.policy import Credential, EgressPolicy, NameRule, parse_policy

if TYPE_CHECKING:
    from controlplane.boundary.ca import EgressCA
    from controlplane.boundary.gateway import Gateway, Reload
    from controlplane.boundary.render import GatewaySpec, Listener, Rendered, documents

__all__ = [
    "Credential",
    "EgressCA",
    "EgressPolicy",
    "Gateway",
    "GatewaySpec",
    "Listener",
    "NameRule",
    "Reload",
    "Rendered",
    "documents",
    "parse_policy",
]
__getattr__ = exports(
    __name__,
    {
        "EgressCA": "ca",
        "Gateway": "gateway",
        "Reload": "gateway",
        "GatewaySpec": "render",
        "Listener": "render",
        "Rendered": "render",
        "documents": "render",
    },
)
