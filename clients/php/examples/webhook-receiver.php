<?php
// A webhook endpoint for the broker's HTTP SMS API: checks the signature (X-Signature = hex
// HMAC-SHA256 of the raw body followed by X-Timestamp, keyed with the broker's signing key),
// refuses stale or forged calls with 401, ignores an event it already has (same "id"), and
// records the rest. Answer 2xx quickly: the broker retries anything else.
// Try it: WSMB_WEBHOOK_KEY=$(wsmb-broker webhook-key) php -S 127.0.0.1:8080 webhook-receiver.php
// then register http://127.0.0.1:8080/ for sms:sent (docs/http-api.md#webhooks).
// WSMB_WEBHOOK_LOG: where events go, one JSON line each (default: the server's log).
$key = getenv('WSMB_WEBHOOK_KEY');
$log = getenv('WSMB_WEBHOOK_LOG') ?: 'php://stderr';
if ($key === false || $key === '') {
    http_response_code(500);
    error_log('set WSMB_WEBHOOK_KEY to the broker\'s key (wsmb-broker webhook-key)');
    exit;
}

$body = file_get_contents('php://input');
$ts = $_SERVER['HTTP_X_TIMESTAMP'] ?? '';
$sig = $_SERVER['HTTP_X_SIGNATURE'] ?? '';
$want = hash_hmac('sha256', $body . $ts, $key);
if (!hash_equals($want, $sig) || !ctype_digit($ts) || abs(time() - (int)$ts) > 300) {
    http_response_code(401);
    echo "bad signature\n";
    exit;
}

$event = json_decode($body, true);
if (!is_array($event) || !isset($event['id'], $event['event'])) {
    http_response_code(400);
    exit;
}
// A call may come twice (the broker stopped while making it): the event id tells. Here a
// marker directory per id; an application would keep the ids in its database.
$seen = sys_get_temp_dir() . '/wsmb-webhook-' . md5($event['id']);
if (!@mkdir($seen)) {
    http_response_code(204);
    exit;
}
$p = $event['payload'] ?? [];
file_put_contents($log, json_encode([
    'event' => $event['event'],
    'id' => $event['id'],
    'messageId' => $p['messageId'] ?? null,
    'phoneNumber' => $p['phoneNumber'] ?? null,
    'reason' => $p['reason'] ?? null,
]) . "\n", FILE_APPEND | LOCK_EX);
http_response_code(204);
