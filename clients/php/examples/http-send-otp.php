<?php
// Send an OTP through the broker's HTTP SMS API with plain curl (no library, no WebSocket),
// then print its state until the modem has sent it.
// Usage: WSMB_PASSWORD=... php http-send-otp.php +6281234567890 "Your code is 123456"
// WSMB_API defaults to http://127.0.0.1:8888/3rdparty/v1 and WSMB_USER to qa (the demo's).
$api = rtrim(getenv('WSMB_API') ?: 'http://127.0.0.1:8888/3rdparty/v1', '/');
$auth = (getenv('WSMB_USER') ?: 'qa') . ':' . getenv('WSMB_PASSWORD');

function call(string $method, string $url, string $auth, ?array $body = null): array
{
    $ch = curl_init($url);
    curl_setopt_array($ch, [
        CURLOPT_CUSTOMREQUEST => $method,
        CURLOPT_USERPWD => $auth,
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 10,
        CURLOPT_HTTPHEADER => ['Content-Type: application/json'],
    ]);
    if ($body !== null) {
        curl_setopt($ch, CURLOPT_POSTFIELDS, json_encode($body));
    }
    $out = curl_exec($ch);
    if ($out === false) {
        fwrite(STDERR, 'cannot reach the broker: ' . curl_error($ch) . "\n");
        exit(2);
    }
    $status = curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
    $json = json_decode($out, true) ?? [];
    if ($status >= 400) {
        fwrite(STDERR, "HTTP $status: " . ($json['message'] ?? $out) . "\n");
        exit(1);
    }
    return $json;
}

$to = $argv[1] ?? '+6281234567890';
$text = $argv[2] ?? 'Your code is ' . random_int(100000, 999999);
$id = 'otp-' . bin2hex(random_bytes(6)); // an id of our own: a retried request is not sent twice
$state = call('POST', "$api/messages", $auth, [
    'id' => $id,
    'textMessage' => ['text' => $text],
    'phoneNumbers' => [$to],
    'ttl' => 300, // an OTP is worthless after 5 minutes: not sent later than that
    'priority' => 100, // the OTP lane: before any bulk message waiting at the gateway
]);
echo "accepted: {$state['state']} (id {$state['id']})\n";
for ($i = 0; $i < 300 && in_array($state['state'], ['Pending', 'Processed'], true); $i++) {
    usleep(100000);
    $state = call('GET', "$api/messages/" . rawurlencode($id), $auth);
}
$error = $state['recipients'][0]['error'] ?? null;
echo "state: {$state['state']}" . ($error ? " ($error)" : '') . "\n";
exit($state['state'] === 'Failed' ? 1 : 0);
