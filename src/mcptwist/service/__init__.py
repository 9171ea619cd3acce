"""The running daemon: the service tree (listeners, the fleet of servers, the
session registry, the reloader), the admin API's actions, and the reload."""
