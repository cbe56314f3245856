<?php
// Send an SMS and wait until the gateway reports it sent (or why not).
// Usage: WSMB_PASSWORD=... php wait-sent.php +6281234567890 "Your order has shipped"
require __DIR__ . '/../src/Client.php';

$wsmb = Wsmb\Client::fromEnv();
try {
    $wsmb->watchStatus(); // before sending, so that no event is missed
    $job = $wsmb->sendSms($argv[1] ?? '+6281234567890', $argv[2] ?? 'Hello from WSMB');
    echo "accepted by the broker as {$job['id']}\n";
    $event = $wsmb->waitForStatus($job['id'], 120);
    if ($event['status'] === 'sent') {
        echo "sent by modem {$event['modem']} to {$event['receiver']}\n";
        exit(0);
    }
    echo "{$event['status']}: " . ($event['reason'] ?? '') . (!empty($event['ambiguous']) ? ' (it may have gone out)' : '') . "\n";
    exit(1);
} catch (Wsmb\AuthenticationException $e) {
    fwrite(STDERR, "check WSMB_USER and WSMB_PASSWORD: {$e->getMessage()}\n");
} catch (Wsmb\RefusedException $e) {
    fwrite(STDERR, "refused ({$e->getResponseCode()}): {$e->getMessage()}\n");
} catch (Wsmb\TimeoutException $e) {
    fwrite(STDERR, "{$e->getMessage()}\n");
} catch (Wsmb\ConnectionException $e) {
    fwrite(STDERR, "broker unreachable: {$e->getMessage()}\n");
}
exit(2);
