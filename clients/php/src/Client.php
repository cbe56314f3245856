<?php
/**
 * WSMB PHP client: send SMS jobs through a wsmb-broker and follow their status events.
 *
 * One file, no extension beyond what Debian's php-cli has (sockets through streams, OpenSSL
 * for wss://), PHP 7.4 to 8.x.
 *
 *     require 'Client.php';
 *     $wsmb = new Wsmb\Client('ws://127.0.0.1:8888/', 'qa', getenv('WSMB_PASSWORD'));
 *     $result = $wsmb->sendSms('+6281234567890', 'Your code is 482913');
 *
 * - sendSms()/send() wait for the broker's send-result (with a timeout) and throw when the
 *   broker did not take the job: RefusedException (with the response code and reason).
 * - watchStatus() then waitForStatus($id) waits for a job's `sent` / `failed` / `expired`.
 * - listenStatus($callback) is a receive loop for a long-running worker: acknowledged
 *   delivery (nothing is lost while the worker is down when the broker has storage), and it
 *   reconnects with back-off when the broker restarts or the network drops.
 *
 * Errors: AuthenticationException (credentials refused), ConnectionException (broker
 * unreachable, TLS refused, connection lost), TimeoutException (no answer in time),
 * RefusedException (a frame or message refused); all extend Wsmb\Exception.
 *
 * The protocol: docs/protocol.md of the WSMB repository.
 */

declare(strict_types=1);

namespace Wsmb;

/** Every error of this client. */
class Exception extends \RuntimeException
{
}

/** The broker is unreachable, refused the TLS handshake, or the connection was lost. */
class ConnectionException extends Exception
{
}

/** The broker refused the user name or password. */
class AuthenticationException extends Exception
{
}

/** No answer within the timeout. */
class TimeoutException extends Exception
{
}

/** The broker refused a frame or a message; getResponseCode() says why (docs/protocol.md). */
class RefusedException extends Exception
{
    /** @var string */
    private $responseCode;
    /** @var string */
    private $reason;

    public function __construct(string $message, string $responseCode, string $reason)
    {
        parent::__construct($message);
        $this->responseCode = $responseCode;
        $this->reason = $reason;
    }

    /** The broker's two-digit response code ("04" storage full, "12" invalid channel, ...). */
    public function getResponseCode(): string
    {
        return $this->responseCode;
    }

    /** The broker's explanation, when it gave one. */
    public function getReason(): string
    {
        return $this->reason;
    }
}

/** A connection to a wsmb-broker. */
final class Client
{
    const VERSION = '0.1.0';
    const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
    /** The largest frame accepted from the broker (its own limit is 1 MiB by default). */
    const MAX_FRAME_BYTES = 16777216;
    /** Messages read while waiting for a reply are kept, at most this many. */
    const MAX_PENDING = 10000;
    const FINAL_STATUSES = array('sent', 'failed', 'expired');

    /** @var string */
    private $host;
    /** @var int */
    private $port;
    /** @var bool */
    private $tls;
    /** @var string */
    private $path;
    /** @var string */
    private $user;
    /** @var string */
    private $password;
    /** @var array<string,mixed> */
    private $options;
    /** @var resource|null */
    private $sock = null;
    /** @var string */
    private $buf = '';
    /** @var array<int,array<string,mixed>> messages read while waiting for replies */
    private $pending = array();
    /** @var array<string,bool> channel => acknowledged mode, restored after a reconnect */
    private $subscriptions = array();
    /** @var array<int,array<string,mixed>> status events seen by waitForStatus, by arrival */
    private $events = array();

    /**
     * @param string $url      ws://host:port/path or wss://host:port/path
     * @param string $user     a user of the broker's htpasswd file
     * @param string $password its password
     * @param array  $options  timeout (seconds, default 10: connecting and each reply),
     *                         ca_file (PEM file of a private CA or self-signed certificate
     *                         for wss://), verify_peer (default true), channel (default
     *                         "sms"), status_channel (default "sms-status")
     */
    public function __construct(string $url, string $user, string $password, array $options = array())
    {
        $parts = parse_url($url);
        $scheme = isset($parts['scheme']) ? strtolower($parts['scheme']) : '';
        if ($parts === false || !isset($parts['host']) || ($scheme !== 'ws' && $scheme !== 'wss')) {
            throw new \InvalidArgumentException(
                "WSMB broker URL \"$url\" is not a ws:// or wss:// URL (e.g. wss://broker.example.com/)"
            );
        }
        $this->tls = $scheme === 'wss';
        $this->host = $parts['host'];
        $this->port = isset($parts['port']) ? (int) $parts['port'] : ($this->tls ? 443 : 80);
        $this->path = (isset($parts['path']) && $parts['path'] !== '' ? $parts['path'] : '/')
            . (isset($parts['query']) ? '?' . $parts['query'] : '');
        if ($user === '' || strpos($user, ':') !== false) {
            throw new \InvalidArgumentException('the WSMB user name must be non-empty and without ":"');
        }
        $this->user = $user;
        $this->password = $password;
        $this->options = $options + array(
            'timeout' => 10.0,
            'ca_file' => null,
            'verify_peer' => true,
            'channel' => 'sms',
            'status_channel' => 'sms-status',
        );
    }

    /** A client from WSMB_URL (default ws://127.0.0.1:8888/), WSMB_USER and WSMB_PASSWORD. */
    public static function fromEnv(array $options = array()): self
    {
        $url = getenv('WSMB_URL') ?: 'ws://127.0.0.1:8888/';
        $user = getenv('WSMB_USER') ?: 'qa';
        $password = getenv('WSMB_PASSWORD');
        if ($password === false) {
            throw new \InvalidArgumentException('set WSMB_PASSWORD to the broker password of ' . $user);
        }
        $ca = getenv('WSMB_CA_FILE');
        if ($ca !== false && $ca !== '' && !isset($options['ca_file'])) {
            $options['ca_file'] = $ca;
        }
        return new self($url, $user, $password, $options);
    }

    public function __destruct()
    {
        $this->close();
    }

    /** Connects (if not connected): TCP or TLS, the WebSocket upgrade, then the broker's welcome. */
    public function connect(): void
    {
        if ($this->sock !== null) {
            return;
        }
        $timeout = (float) $this->options['timeout'];
        $deadline = microtime(true) + $timeout;
        $where = ($this->tls ? 'wss' : 'ws') . "://{$this->host}:{$this->port}";
        $ssl = array(
            'verify_peer' => (bool) $this->options['verify_peer'],
            'verify_peer_name' => (bool) $this->options['verify_peer'],
            'peer_name' => $this->host,
            'SNI_enabled' => true,
        );
        if ($this->options['ca_file'] !== null) {
            $ssl['cafile'] = (string) $this->options['ca_file'];
        }
        $context = stream_context_create(array('ssl' => $ssl));
        $address = ($this->tls ? 'ssl://' : 'tcp://') . $this->host . ':' . $this->port;
        $errno = 0;
        $errstr = '';
        $warning = '';
        set_error_handler(function ($no, $msg) use (&$warning) {
            $warning .= ($warning === '' ? '' : '; ') . $msg;
            return true;
        });
        try {
            $sock = stream_socket_client($address, $errno, $errstr, $timeout, STREAM_CLIENT_CONNECT, $context);
        } finally {
            restore_error_handler();
        }
        if ($sock === false) {
            $why = trim($errstr . ($warning !== '' ? " ($warning)" : ''));
            if ($this->tls && (stripos($warning, 'certificate') !== false || stripos($warning, 'SSL') !== false)) {
                throw new ConnectionException("TLS handshake with the WSMB broker at $where failed: $why"
                    . ' (a self-signed or private certificate needs the ca_file option)');
            }
            throw new ConnectionException("cannot connect to the WSMB broker at $where: " . ($why !== '' ? $why : "error $errno"));
        }
        stream_set_blocking($sock, false);
        $this->sock = $sock;
        $this->buf = '';
        try {
            $key = base64_encode(random_bytes(16));
            $hostHeader = $this->host . (($this->port === ($this->tls ? 443 : 80)) ? '' : ':' . $this->port);
            $this->write("GET {$this->path} HTTP/1.1\r\n"
                . "Host: $hostHeader\r\n"
                . "Upgrade: websocket\r\n"
                . "Connection: Upgrade\r\n"
                . "Sec-WebSocket-Key: $key\r\n"
                . "Sec-WebSocket-Version: 13\r\n"
                . 'Authorization: Basic ' . base64_encode($this->user . ':' . $this->password) . "\r\n"
                . 'User-Agent: wsmb-php/' . self::VERSION . "\r\n\r\n", $deadline);
            $head = $this->readHead($deadline, $where);
            $status = (int) substr($head, 9, 3);
            if ($status === 401 || $status === 403) {
                throw new AuthenticationException("the WSMB broker at $where refused user \"{$this->user}\" (HTTP $status)");
            }
            if ($status !== 101) {
                $first = strtok($head, "\r\n");
                throw new ConnectionException("the server at $where did not accept a WebSocket connection: $first"
                    . ' (wrong URL path, or not a WSMB broker?)');
            }
            $accept = base64_encode(sha1($key . self::GUID, true));
            if (!preg_match('/^Sec-WebSocket-Accept:\s*(\S+)/mi', $head, $m) || $m[1] !== $accept) {
                throw new ConnectionException("the server at $where answered the upgrade without a valid Sec-WebSocket-Accept");
            }
            // The welcome: `connect` 00, or 01 for refused credentials (then the broker closes).
            $reply = $this->readReply($deadline);
            if ($reply['command'] !== 'connect') {
                throw new ConnectionException("expected the broker's connect frame, got {$reply['command']}");
            }
            if ($reply['response_code'] !== '00') {
                throw new AuthenticationException("the WSMB broker at $where refused user \"{$this->user}\": wrong user name or password");
            }
            foreach ($this->subscriptions as $channel => $ack) {
                $this->sendFrame($this->receiveFrame($channel, $ack), $deadline);
            }
        } catch (\Throwable $e) {
            $this->drop();
            throw $e;
        }
    }

    /** Closes the connection (a close frame, then the socket). */
    public function close(): void
    {
        if ($this->sock === null) {
            return;
        }
        try {
            $this->writeFrame(0x8, pack('n', 1000), microtime(true) + 1.0);
        } catch (\Throwable $e) {
            // closing anyway
        }
        $this->drop();
    }

    /** Whether the client holds an open connection. */
    public function isConnected(): bool
    {
        return $this->sock !== null;
    }

    /**
     * Sends one SMS job on the jobs channel and waits for the broker's acceptance.
     *
     * @param string $receiver  +62812..., 0062812... or a national number (08...)
     * @param string $message   any Unicode text; long texts become concatenated SMS
     * @param array  $options   id (default: a random one; the agent never sends one id twice),
     *                          expiration (epoch seconds: not sent after it), ttl (seconds
     *                          the broker keeps it waiting for an agent), priority (-128..127;
     *                          100 and above jump the gateway's queue: use it for OTPs),
     *                          delivery_report (true/false: ask the network for a delivery
     *                          report), sim (1, 2, ...: the gateway's modem by position)
     * @return array id, message_id, response_code ("00": handed to an agent, or stored for one),
     *               stored, receivers
     */
    public function sendSms(string $receiver, string $message, array $options = array()): array
    {
        $id = isset($options['id']) ? (string) $options['id'] : 'php-' . bin2hex(random_bytes(8));
        $job = array('id' => $id, 'time' => time(), 'receiver' => $receiver, 'message' => $message);
        if (isset($options['expiration'])) {
            $job['expiration'] = (int) $options['expiration'];
        }
        if (isset($options['priority'])) {
            if (!is_int($options['priority']) || $options['priority'] < -128 || $options['priority'] > 127) {
                throw new \InvalidArgumentException('priority must be a whole number from -128 to 127 (100 and above: the OTP lane)');
            }
            $job['priority'] = $options['priority'];
        }
        if (isset($options['delivery_report'])) {
            $job['delivery_report'] = (bool) $options['delivery_report'];
        }
        if (isset($options['sim'])) {
            if (!is_int($options['sim']) || $options['sim'] < 1 || $options['sim'] > 64) {
                throw new \InvalidArgumentException('sim must be a whole number from 1 to 64: the gateway\'s modem by position (1 = the first [[modem]] of its configuration)');
            }
            $job['sim'] = $options['sim'];
        }
        $fields = array('number_of_receiver' => 1);
        if (isset($options['ttl'])) {
            $fields['ttl'] = (int) $options['ttl'];
        }
        $result = $this->send((string) $this->options['channel'], array($job), $fields);
        $result['id'] = $id;
        return $result;
    }

    /**
     * Sends one send-message frame with `items` as data and waits for its send-result.
     * Returns send-result's data plus response_code. Throws RefusedException unless the broker
     * took the message ("00"), or stored it for a receiver to come ("02" with stored: true).
     */
    public function send(string $channel, array $items, array $fields = array()): array
    {
        $deadline = microtime(true) + (float) $this->options['timeout'];
        $this->connect();
        $frame = array('command' => 'send-message', 'channel' => $channel) + $fields
            + array('protocol' => 2, 'data' => array_values($items));
        $this->sendFrame($frame, $deadline);
        $reply = $this->readReply($deadline);
        $data = isset($reply['data'][0]) && is_array($reply['data'][0]) ? $reply['data'][0] : array();
        $reason = isset($data['reason']) ? (string) $data['reason'] : '';
        if ($reply['command'] === 'error') {
            throw new RefusedException("the broker refused the frame ({$reply['response_code']} {$reply['response_text']}): $reason",
                $reply['response_code'], $reason);
        }
        if ($reply['command'] !== 'send-result') {
            throw new ConnectionException("expected a send-result, got {$reply['command']}");
        }
        $code = $reply['response_code'];
        $stored = isset($data['stored']) && $data['stored'] === true;
        if ($code !== '00' && !($code === '02' && $stored)) {
            $what = $code === '02' ? 'no receiver on channel "' . $channel . '" and the broker has no storage'
                : $reply['response_text'] . ($reason !== '' ? ": $reason" : '');
            throw new RefusedException("the broker did not take the message ($code): $what", $code, $reason);
        }
        $data['response_code'] = $code;
        return $data;
    }

    /** Receives on `channel` from now on (acknowledged mode when `ack`); kept across reconnects. */
    public function subscribe(string $channel, bool $ack = false): void
    {
        $this->connect();
        $this->subscriptions[$channel] = $ack;
        $this->sendFrame($this->receiveFrame($channel, $ack), microtime(true) + (float) $this->options['timeout']);
    }

    /** Receives status events from now on; call it before sending the jobs to wait for. */
    public function watchStatus(): void
    {
        $this->subscribe((string) $this->options['status_channel'], false);
    }

    /**
     * Waits for a final status event (sent, failed or expired) of job `id`, or one of
     * `statuses`. Needs watchStatus() before the job was sent. Returns the event
     * (id, status, time, receiver, modem, reason, error_code, ambiguous, ...).
     */
    public function waitForStatus(string $id, float $timeout = 60.0, array $statuses = self::FINAL_STATUSES): array
    {
        $channel = (string) $this->options['status_channel'];
        if (!isset($this->subscriptions[$channel])) {
            throw new \LogicException('call watchStatus() before sending the job whose status you wait for');
        }
        $deadline = microtime(true) + $timeout;
        while (true) {
            foreach ($this->events as $i => $ev) {
                if (isset($ev['id'], $ev['status']) && (string) $ev['id'] === $id && in_array($ev['status'], $statuses, true)) {
                    unset($this->events[$i]);
                    return $ev;
                }
            }
            $left = $deadline - microtime(true);
            if ($left <= 0) {
                throw new TimeoutException("no " . implode('/', $statuses) . " status for \"$id\" within {$timeout} s"
                    . ' (is the gateway agent connected to the broker?)');
            }
            $m = $this->next($left);
            if ($m === null || $m['channel'] !== $channel) {
                continue;
            }
            foreach ($m['data'] as $ev) {
                // Heartbeats are the agent's word to the broker, not a job's status.
                if (is_array($ev) && !(isset($ev['status']) && $ev['status'] === 'heartbeat')) {
                    $this->events[] = $ev;
                }
            }
            if (count($this->events) > self::MAX_PENDING) {
                $this->events = array_slice($this->events, -self::MAX_PENDING);
            }
            if ($m['message_id'] !== null) {
                $this->ack($m);
            }
        }
    }

    /**
     * The next message on a subscribed channel, or null after `timeout` seconds. Returns
     * channel, data (the items), frame (the sender's whole frame), message_id and delivery
     * (acknowledged mode; then pass it to ack() once handled).
     */
    public function next(float $timeout): ?array
    {
        if (!empty($this->pending)) {
            return array_shift($this->pending);
        }
        $this->connect();
        $deadline = microtime(true) + $timeout;
        while (true) {
            $text = $this->readMessage($deadline, true);
            if ($text === null) {
                return null;
            }
            $msg = $this->classify($text);
            if ($msg !== null && !isset($msg['response_code'])) {
                return $msg;
            }
        }
    }

    /** Acknowledges a message from next() that came in acknowledged mode. */
    public function ack(array $message): void
    {
        if (!isset($message['message_id']) || $message['message_id'] === null) {
            return;
        }
        $this->sendFrame(array('command' => 'ack', 'data' => array($message['message_id'])),
            microtime(true) + (float) $this->options['timeout']);
    }

    /**
     * A receive loop for status events, for a long-running worker: `onEvent(array $event)` is
     * called for each event (return false to stop the loop). Acknowledged delivery: an event is
     * acknowledged once its callback returned, so an event whose callback threw comes again.
     * Reconnects with back-off (1 s doubling to 30 s) when the connection fails; refused
     * credentials end the loop with AuthenticationException.
     *
     * @param array $options on_error: callable(\Throwable $e, float $retryIn) told of each
     *                       reconnect (default: error_log); idle: seconds without a message
     *                       before the connection is checked with a ping (default 30);
     *                       heartbeats: true to be given the agent's heartbeats too (status
     *                       "heartbeat", for the broker's status page; default false)
     */
    public function listenStatus(callable $onEvent, array $options = array()): void
    {
        $heartbeats = !empty($options['heartbeats']);
        $this->listen(function (array $m) use ($onEvent, $heartbeats) {
            foreach ($m['data'] as $ev) {
                if (!is_array($ev)) {
                    continue;
                }
                if (!$heartbeats && isset($ev['status']) && $ev['status'] === 'heartbeat') {
                    continue;
                }
                if ($onEvent($ev) === false) {
                    return false;
                }
            }
            return null;
        }, array((string) $this->options['status_channel']), $options);
    }

    /** Like listenStatus(), for whole messages of any channels: `onMessage(array $message)`. */
    public function listen(callable $onMessage, array $channels, array $options = array()): void
    {
        $onError = isset($options['on_error']) ? $options['on_error'] : function (\Throwable $e, float $retryIn) {
            error_log("wsmb: {$e->getMessage()}; reconnecting in {$retryIn} s");
        };
        $idle = isset($options['idle']) ? (float) $options['idle'] : 30.0;
        foreach ($channels as $c) {
            $this->subscriptions[(string) $c] = true;
        }
        $backoff = 1.0;
        while (true) {
            try {
                $this->connect();
                $m = $this->next($idle);
                if ($m === null) {
                    $this->ping();
                    continue;
                }
                $backoff = 1.0;
                $stop = $onMessage($m) === false;
                $this->ack($m);
                if ($stop) {
                    return;
                }
            } catch (ConnectionException $e) {
                $this->drop();
                $onError($e, $backoff);
                usleep((int) ($backoff * 1e6));
                $backoff = min(30.0, $backoff * 2);
            } catch (TimeoutException $e) {
                $this->drop();
                $onError($e, $backoff);
                usleep((int) ($backoff * 1e6));
                $backoff = min(30.0, $backoff * 2);
            }
        }
    }

    /** Asks the broker whether it is healthy; returns its connect-shaped answer's data. */
    public function ping(): array
    {
        $deadline = microtime(true) + (float) $this->options['timeout'];
        $this->connect();
        $this->sendFrame(array('command' => 'ping'), $deadline);
        $reply = $this->readReply($deadline);
        return isset($reply['data'][0]) && is_array($reply['data'][0]) ? $reply['data'][0] : array();
    }

    // ---- frames ----

    private function receiveFrame(string $channel, bool $ack): array
    {
        $f = array('command' => 'receive-message', 'channel' => $channel, 'protocol' => 2);
        if ($ack) {
            $f['ack'] = true;
        }
        return $f;
    }

    private function sendFrame(array $frame, float $deadline): void
    {
        $json = json_encode($frame, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
        if ($json === false) {
            throw new \InvalidArgumentException('cannot encode the frame as JSON: ' . json_last_error_msg()
                . ' (texts must be UTF-8)');
        }
        $this->writeFrame(0x1, $json, $deadline);
    }

    /** Reads until a reply (a frame with response_code); messages met meanwhile are kept. */
    private function readReply(float $deadline): array
    {
        while (true) {
            $text = $this->readMessage($deadline, false);
            if ($text === null) {
                throw new TimeoutException('no answer from the WSMB broker within ' . $this->options['timeout'] . ' s');
            }
            $msg = $this->classify($text);
            if ($msg === null) {
                continue;
            }
            if (isset($msg['response_code'])) {
                return $msg;
            }
            if (count($this->pending) >= self::MAX_PENDING) {
                array_shift($this->pending);
            }
            $this->pending[] = $msg;
        }
    }

    /** A reply (command, response_code, response_text, data) or a message; null if neither. */
    private function classify(string $text): ?array
    {
        $v = json_decode($text, true);
        if (!is_array($v)) {
            return null;
        }
        if (isset($v['response_code'])) {
            return array(
                'command' => isset($v['command']) ? (string) $v['command'] : '',
                'response_code' => (string) $v['response_code'],
                'response_text' => isset($v['response_text']) ? (string) $v['response_text'] : '',
                'data' => isset($v['data']) && is_array($v['data']) ? $v['data'] : array(),
            );
        }
        $messageId = null;
        $delivery = null;
        if (isset($v['command']) && $v['command'] === 'deliver' && isset($v['frame']) && is_array($v['frame'])) {
            $messageId = isset($v['message_id']) ? (string) $v['message_id'] : null;
            $delivery = isset($v['delivery']) ? (int) $v['delivery'] : null;
            $v = $v['frame'];
        }
        $data = isset($v['data']) ? $v['data'] : array();
        if (is_array($data) && !array_key_exists(0, $data) && !empty($data)) {
            $data = array($data);
        }
        return array(
            'channel' => isset($v['channel']) ? (string) $v['channel'] : '',
            'data' => is_array($data) ? $data : array(),
            'frame' => $v,
            'message_id' => $messageId,
            'delivery' => $delivery,
        );
    }

    /** The next text message, or null at the deadline (`idleOk`) / TimeoutException. */
    private function readMessage(float $deadline, bool $idleOk): ?string
    {
        $message = '';
        $inMessage = false;
        while (true) {
            $h = $this->fill(2, $deadline);
            if ($h === null) {
                if ($idleOk && !$inMessage) {
                    return null;
                }
                throw new TimeoutException('the WSMB broker stopped in the middle of a frame');
            }
            $b0 = ord($this->buf[0]);
            $b1 = ord($this->buf[1]);
            $fin = ($b0 & 0x80) !== 0;
            $opcode = $b0 & 0x0F;
            $len = $b1 & 0x7F;
            $headLen = 2;
            if ($len === 126) {
                $headLen = 4;
            } elseif ($len === 127) {
                $headLen = 10;
            }
            if (($b1 & 0x80) !== 0) {
                throw $this->protocolError('a masked frame from the server');
            }
            if ($this->fill($headLen, $deadline) === null) {
                throw new TimeoutException('the WSMB broker stopped in the middle of a frame');
            }
            if ($len === 126) {
                $len = unpack('n', substr($this->buf, 2, 2))[1];
            } elseif ($len === 127) {
                $parts = unpack('N2', substr($this->buf, 2, 8));
                if ($parts[1] !== 0) {
                    throw $this->protocolError('a frame over 4 GiB');
                }
                $len = $parts[2];
            }
            if ($len > self::MAX_FRAME_BYTES || strlen($message) + $len > self::MAX_FRAME_BYTES) {
                throw $this->protocolError("a message over " . self::MAX_FRAME_BYTES . " bytes");
            }
            if ($this->fill($headLen + $len, $deadline) === null) {
                throw new TimeoutException('the WSMB broker stopped in the middle of a frame');
            }
            $payload = (string) substr($this->buf, $headLen, $len);
            $this->buf = (string) substr($this->buf, $headLen + $len);
            switch ($opcode) {
                case 0x9: // ping
                    $this->writeFrame(0xA, $payload, $deadline + 5);
                    continue 2;
                case 0xA: // pong
                    continue 2;
                case 0x8: // close
                    $code = strlen($payload) >= 2 ? unpack('n', substr($payload, 0, 2))[1] : 1005;
                    $why = (string) substr($payload, 2);
                    try {
                        $this->writeFrame(0x8, pack('n', $code === 1005 ? 1000 : $code), microtime(true) + 1.0);
                    } catch (\Throwable $e) {
                        // closing anyway
                    }
                    $this->drop();
                    $what = array(1001 => 'the broker is shutting down', 1008 => 'policy (credentials, or a slow reader)',
                        1009 => 'a frame too large for the broker');
                    throw new ConnectionException("the WSMB broker closed the connection ($code"
                        . (isset($what[$code]) ? ', ' . $what[$code] : '') . ($why !== '' ? ": $why" : '') . ')');
                case 0x0:
                    if (!$inMessage) {
                        throw $this->protocolError('a continuation frame without a message');
                    }
                    $message .= $payload;
                    break;
                case 0x1:
                case 0x2:
                    if ($inMessage) {
                        throw $this->protocolError('a new message inside a fragmented one');
                    }
                    $message = $payload;
                    $inMessage = true;
                    break;
                default:
                    throw $this->protocolError("opcode $opcode");
            }
            if ($fin) {
                return $message;
            }
        }
    }

    private function protocolError(string $what): ConnectionException
    {
        $this->drop();
        return new ConnectionException("WebSocket protocol error from the broker: $what");
    }

    /** Reads until the buffer holds `n` bytes; null at the deadline. */
    private function fill(int $n, float $deadline): ?string
    {
        while (strlen($this->buf) < $n) {
            if ($this->sock === null) {
                throw new ConnectionException('not connected to the WSMB broker');
            }
            $chunk = @fread($this->sock, 65536);
            if ($chunk === false) {
                $this->drop();
                throw new ConnectionException('the connection to the WSMB broker was lost (read failed)');
            }
            if ($chunk !== '') {
                $this->buf .= $chunk;
                continue;
            }
            if (feof($this->sock)) {
                $this->drop();
                throw new ConnectionException('the connection to the WSMB broker was lost');
            }
            $left = $deadline - microtime(true);
            if ($left <= 0) {
                return null;
            }
            $r = array($this->sock);
            $w = null;
            $e = null;
            $sec = (int) floor($left);
            @stream_select($r, $w, $e, $sec, (int) (($left - $sec) * 1e6));
        }
        return $this->buf;
    }

    /** The HTTP response head of the upgrade (what follows it stays in the buffer). */
    private function readHead(float $deadline, string $where): string
    {
        while (($end = strpos($this->buf, "\r\n\r\n")) === false) {
            if (strlen($this->buf) > 16384) {
                throw new ConnectionException("the server at $where sent an oversized HTTP response");
            }
            try {
                $got = $this->fill(strlen($this->buf) + 1, $deadline);
            } catch (ConnectionException $e) {
                throw new ConnectionException("the server at $where closed the connection during the WebSocket upgrade"
                    . ($this->tls ? '' : ' (a TLS-only port needs wss://)'));
            }
            if ($got === null) {
                throw new TimeoutException("no answer to the WebSocket upgrade from $where within {$this->options['timeout']} s");
            }
        }
        $head = substr($this->buf, 0, $end);
        $this->buf = (string) substr($this->buf, $end + 4);
        return $head;
    }

    private function writeFrame(int $opcode, string $payload, float $deadline): void
    {
        $len = strlen($payload);
        $head = chr(0x80 | $opcode);
        if ($len < 126) {
            $head .= chr(0x80 | $len);
        } elseif ($len < 65536) {
            $head .= chr(0x80 | 126) . pack('n', $len);
        } else {
            $head .= chr(0x80 | 127) . pack('NN', 0, $len);
        }
        $mask = random_bytes(4);
        $masked = $payload ^ str_repeat($mask, intdiv($len, 4) + 1);
        $this->write($head . $mask . substr($masked, 0, $len), $deadline);
    }

    private function write(string $bytes, float $deadline): void
    {
        while ($bytes !== '') {
            if ($this->sock === null) {
                throw new ConnectionException('not connected to the WSMB broker');
            }
            $n = @fwrite($this->sock, $bytes);
            if ($n === false) {
                $this->drop();
                throw new ConnectionException('the connection to the WSMB broker was lost (write failed)');
            }
            $bytes = (string) substr($bytes, $n);
            if ($bytes === '') {
                return;
            }
            $left = $deadline - microtime(true);
            if ($left <= 0) {
                $this->drop();
                throw new TimeoutException('the WSMB broker did not take what we sent in time');
            }
            $r = null;
            $w = array($this->sock);
            $e = null;
            $sec = (int) floor($left);
            @stream_select($r, $w, $e, $sec, (int) (($left - $sec) * 1e6));
        }
    }

    private function drop(): void
    {
        if ($this->sock !== null) {
            @fclose($this->sock);
        }
        $this->sock = null;
        $this->buf = '';
    }
}
