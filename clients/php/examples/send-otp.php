<?php
// Send an OTP in five lines. Usage: WSMB_PASSWORD=... php send-otp.php +6281234567890
// (WSMB_URL defaults to ws://127.0.0.1:8888/ and WSMB_USER to qa, the demo's broker and user.)
require __DIR__ . '/../src/Client.php';
$wsmb = Wsmb\Client::fromEnv();
$code = random_int(100000, 999999);
$job = $wsmb->sendSms($argv[1] ?? '+6281234567890', "Your code is $code. It expires in 5 minutes.", ['priority' => 100, 'expiration' => time() + 300]);
echo "OTP $code accepted by the broker as {$job['id']}\n";
