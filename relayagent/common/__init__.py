"""
relayagent's shared vocabulary, as Postfix's global/: the configuration
and its parameter table (``config``), lookup tables (``maps``), the
envelope (``envelope``), delivery outcomes (``status``), the mail log in
Postfix's format (``maillog``) and the session transcript
(``transcript``).  Nothing here imports another part of relayagent.
"""
