"""
The queue manager, as Postfix's qmgr(8): the active queue, destinations
with their concurrency feedback, retries and lifetimes (``scheduler``), and
the end of each delivery attempt (``delivery``).  It calls the smtp
package for each delivery request; nothing there calls back up.
"""
