"""The client mods (Flower ``Mod``s on the ClientApp's train handler): the clients' defences,
their leakage audit, and fault injection for testing the server's screening."""
