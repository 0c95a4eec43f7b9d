"""
The SMTP client, as Postfix's smtp(8): nexthop and address lookup
(``resolve``), connecting with the fallback across addresses and the
connection cache (``connect``, ``conncache``), the ESMTP session
(``session``, ``reply``, ``body``), TLS and SASL (``tls``, ``sasl``,
``security``) and the 8bit-to-7bit converter (``mime``).
"""
