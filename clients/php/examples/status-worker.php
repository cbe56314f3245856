<?php
// A long-running worker that records every status event (run it under systemd or supervisor).
// Events wait in the broker while it is down; it reconnects by itself.
// Usage: WSMB_PASSWORD=... php status-worker.php   (prints one JSON line per event)
require __DIR__ . '/../src/Client.php';

$wsmb = Wsmb\Client::fromEnv();
$wsmb->listenStatus(function (array $event) {
    // e.g. UPDATE otp SET status = ? WHERE id = ?
    echo json_encode($event), "\n";
    if (getenv('WSMB_STOP_AFTER') !== false && $event['id'] === getenv('WSMB_STOP_AFTER')
        && in_array($event['status'], ['sent', 'failed', 'expired'], true)) {
        return false; // stop (for tests and one-shot use)
    }
    return null;
}, ['on_error' => function (Throwable $e, float $retryIn) {
    echo "reconnecting in {$retryIn} s: {$e->getMessage()}\n";
}]);
