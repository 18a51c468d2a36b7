"""Plugins that come with pacsd, each a plain module following the contract of pacsd.plugins.hooks:
`hl7` tells a RIS or HIS over HL7 v2 (MLLP) that a study's images are available, and `webhook`
POSTs JSON to a URL when an instance is stored or a study is stable. Neither is loaded unless
named in `[hooks] plugins` (e.g. `plugins = ["pacsd.plugins.hl7"]`), with its settings in its
own `[plugin.NAME]` table; both use the standard library only and are best-effort: a message
that cannot be delivered within the plugin's time budget is logged and given up, never queued.
"""
