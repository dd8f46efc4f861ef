/* The screen models: login form, the logged-in screen (lobby, rooms, private
 * conversations), connection state, and the container that says which screen
 * is shown. */
(function (ChatApp, Backbone, _) {
  'use strict';

  var models = ChatApp.models;

  // The login form: what was typed, the server's last refusal, and whether
  // we are waiting for an answer.
  var LoginModel = Backbone.Model.extend({
    defaults: { name: '', error: '', busy: false },

    submitted: function (name) {
      // Clearing the error first means the same refusal twice is still a
      // change, so the view re-renders for it.
      this.set({ name: name, error: '', busy: true });
    },

    refused: function (error) {
      this.set({ error: error, busy: false });
    }
  });

  // The accounts-mode form (issue 13). `notice`: why the form is shown
  // again (signed out, session over); `error`: the last refusal.
  var AccountModel = Backbone.Model.extend({
    defaults: { name: '', error: '', notice: '', busy: false, registering: false },

    submitted: function (name) {
      this.set({ name: name, error: '', notice: '', busy: true });
    },

    refused: function (error) {
      this.set({ error: error, busy: false });
    }
  });

  // What the connection indicator shows.
  var ConnectionModel = Backbone.Model.extend({
    defaults: {
      state: 'connecting', // connecting | connected | relogin | disconnected | reconnecting | stopped | signedOut
      attempt: 0,
      name: '', // set while logged in
      accounts: false // accounts mode: the name is an account's, and one can sign out
    },

    label: function () {
      switch (this.get('state')) {
        case 'connecting': return 'Connecting\u2026';
        case 'connected': return 'Connected';
        case 'relogin': return 'Reconnected, logging in again\u2026';
        case 'disconnected': return 'Disconnected';
        case 'reconnecting': return 'Disconnected \u00b7 reconnecting (attempt ' + this.get('attempt') + ')\u2026';
        case 'stopped': return 'Disconnected';
        case 'signedOut': return 'Not signed in';
        default: return this.get('state');
      }
    },

    view: function () {
      return {
        state: this.get('state'),
        label: this.label(),
        name: this.get('state') === 'connected' ? this.get('name') : '',
        canRetry: this.get('state') === 'stopped',
        // Signing out is also the way out of a session that cannot come back.
        canSignOut: this.get('accounts') && this.get('state') !== 'signedOut'
      };
    }
  });

  /*
   * The logged-in screen: online users, the conversations (the lobby first),
   * which one is shown, and what the reader has seen.
   *
   * The lobby's lines are `chats`, also the lobby conversation's lines.
   *
   * `horizon` is the highest log position seen; it is the `lastPosition`
   * offered when resuming. Join and leave lines without a position (the
   * seed's userJoined/userLeft carry only a name) that arrived after the
   * horizon are "echo candidates": a history answer or a resume replay sends
   * them again, with positions, and they are matched instead of shown twice.
   */
  var HomeModel = Backbone.Model.extend({
    defaults: function () {
      return {
        me: '',
        online: false,           // connected and logged in: chatting is possible
        active: LOBBY_KEY,       // the key of the conversation shown
        directory: false,        // the room directory is shown instead of a conversation
        chatError: ''
      };
    },

    initialize: function (attrs, options) {
      this.users = new models.UserCollection();
      this.chats = new models.ChatCollection();
      this.conversations = new models.ConversationCollection();
      // The lobby conversation's `historyAvailable`, `reachedStart` and
      // `loadingOlder` describe `chats`.
      this.lobby = new models.ConversationModel({ key: LOBBY_KEY, kind: 'lobby', name: 'lobby' }, { chats: this.chats });
      this.conversations.add(this.lobby);
      this.directory = new models.DirectoryModel();
      this.files = new models.FileAccess(null, { base: options && options.base }); // the upload token, for /files URLs
      this.horizon = 0;
      this.summaryPosition = undefined; // the last `conversations` summary's position
      this.session = null;
      this.replayEchoes = [];
    },

    // -- sessions --------------------------------------------------------

    // A `welcome` arrived (first login, re-login, or resume).
    startSession: function (welcome) {
      var before = this.horizon;
      var welcomePosition = toPosition(welcome.position);
      this.session = {
        resumed: !!welcome.resumed,
        before: before,
        welcomePosition: welcomePosition,
        echoes: this.echoCandidates(before),
        liveStart: this.chats.length // history goes before lines that arrive live from here on
      };
      this.replayEchoes = welcome.resumed ? this.echoCandidates(before) : [];
      if (!welcome.resumed && welcomePosition !== undefined) {
        this.horizon = Math.max(this.horizon, welcomePosition);
      }
      this.set({ me: welcome.name, online: true, chatError: '' });
    },

    endSession: function () {
      this.set({ online: false });
    },

    // A log position was delivered: resuming asks for what comes after it.
    seen: function (position) {
      if (position !== undefined) {
        this.horizon = Math.max(this.horizon, position);
      }
    },

    echoCandidates: function (horizon) {
      return this.chats.filter(function (m) {
        var kind = m.get('kind');
        return (kind === 'join' || kind === 'leave') && !m.has('position') && m.get('after') === horizon;
      });
    },

    // -- live events -----------------------------------------------------

    addChat: function (chat) {
      var position = toPosition(chat.position);
      if (position !== undefined && this.replayEchoes.length && position > this.session.before) {
        this.replayEchoes = []; // the replay has moved past what we had seen
      }
      var line = {
        kind: 'chat',
        sender: String(chat.sender),
        message: String(chat.message),
        attachments: models.attachmentsOf(chat.attachments),
        time: chat.time || null,
        position: position
      };
      if (this.addLine(line)) {
        this.arrived(this.lobby, [line]);
      }
    },

    userJoined: function (name, meta) {
      this.users.addName(name);
      this.presence(name, true);
      this.addPresence('join', name, meta);
    },

    userLeft: function (name, meta) {
      this.users.removeName(name);
      this.presence(name, false);
      this.addPresence('leave', name, meta);
    },

    setOnlineUsers: function (names) {
      this.users.resetNames(names);
      var online = new Set(names); // not an object: a user may be called __proto__
      this.conversations.each(function (conversation) {
        conversation.members.each(function (member) {
          member.set('online', online.has(member.get('name')));
        });
        if (conversation.get('kind') === 'private') {
          conversation.set('peerOnline', online.has(conversation.get('name')));
        }
      });
    },

    addNotice: function (text) {
      return this.chats.add({ kind: 'notice', message: text, after: this.horizon });
    },

    addPresence: function (kind, name, meta) {
      var position = toPosition(meta && meta.position);
      if (position === undefined && this.replayEchoes.length) {
        var echo = this.replayEchoes[0];
        if (echo.get('kind') === kind && echo.get('name') === name) {
          this.replayEchoes.shift(); // shown before the connection dropped
          return;
        }
        this.replayEchoes = [];
      }
      // The seed's events carry no time: show when this page learned of it.
      var time = (meta && meta.time) || new Date().toISOString();
      this.addLine({ kind: kind, name: name, time: time, position: position });
    },

    // Returns the line's model, or null when it was shown already.
    addLine: function (attrs) {
      if (attrs.position !== undefined) {
        if (this.chats.get(attrs.position)) {
          return null; // already shown
        }
        this.horizon = Math.max(this.horizon, attrs.position);
      } else {
        attrs.after = this.horizon;
        delete attrs.position;
      }
      return this.chats.add(attrs);
    },

    // -- history ---------------------------------------------------------

    /*
     * The `history` sent after `welcome`: the recent lines, oldest first.
     * Items at or before what we had already seen are skipped; items after
     * the welcome position are skipped too (they are delivered live, as this
     * socket was in the lobby from the welcome on); join/leave items in
     * between first match the position-less lines shown for them.
     */
    mergeHistory: function (history) {
      var session = this.session || { before: this.horizon, welcomePosition: undefined, echoes: [], liveStart: this.chats.length };
      var items = itemsOf(history);
      var echoes = session.echoes.slice();
      var lines = [];
      _.each(items, function (item) {
        var p = item.position;
        if (p <= session.before || this.chats.get(p)) {
          return;
        }
        if (session.welcomePosition !== undefined && p > session.welcomePosition) {
          return;
        }
        if (item.kind !== 'chat' && echoes.length) {
          var echo = echoes[0];
          if (echo.get('kind') === item.kind && echo.get('name') === item.name) {
            echoes.shift();
            echo.set({ position: p, time: echo.get('time') || item.time });
            return;
          }
        }
        lines.push(lineFromItem(item));
      }, this);
      session.echoes = echoes;
      if (lines.length) {
        this.horizon = Math.max(this.horizon, _.last(lines).position);
        this.chats.add(lines, { at: Math.min(session.liveStart, this.chats.length) });
      }
      var firstTime = !this.lobby.get('historyAvailable');
      this.lobby.set({
        historyAvailable: true,
        // Only the first answer says whether older lines exist before the list.
        reachedStart: firstTime ? !!history.reachedStart : this.lobby.get('reachedStart')
      });
      this.trigger('arrived', this.lobby);
    },

    // An older page (the ack of a `history` request): prepend it.
    prependOlder: function (page) {
      var lines = _.filter(_.map(itemsOf(page), lineFromItem), function (line) {
        return !this.chats.get(line.position);
      }, this);
      if (lines.length) {
        this.chats.add(lines, { at: 0 });
      }
      this.lobby.set({ reachedStart: !!page.reachedStart || !lines.length, loadingOlder: false });
    },

    // -- conversations ---------------------------------------------------

    activeConversation: function () {
      return this.conversations.get(this.get('active')) || this.lobby;
    },

    // Show a conversation: it is read from now on.
    select: function (conversation) {
      this.set({ active: conversation.id, directory: false, chatError: '' });
      conversation.set('unread', 0);
      this.trigger('arrived', conversation); // time to mark it read
    },

    room: function (name) {
      return this.conversations.get(roomKey(name));
    },

    // The room conversation for `name` (canonical), made if missing.
    ensureRoom: function (name, attrs) {
      name = String(name);
      var conversation = this.room(name);
      if (!conversation) {
        conversation = new models.ConversationModel({ key: roomKey(name), kind: 'room', name: name });
        this.conversations.add(conversation);
      }
      conversation.set(_.extend({ name: conversation.isLobby() ? 'lobby' : name }, attrs || {}));
      return conversation;
    },

    // The private conversation with `peer`, made if missing.
    ensurePrivate: function (peer, attrs) {
      peer = String(peer);
      var conversation = this.conversations.get(privateKey(peer));
      if (!conversation) {
        conversation = new models.ConversationModel({
          key: privateKey(peer), kind: 'private', name: peer, peerOnline: !!this.users.get(peer)
        });
        this.conversations.add(conversation);
      }
      if (attrs) {
        conversation.set(attrs);
      }
      return conversation;
    },

    // We are no longer in room `name`.
    dropRoom: function (name) {
      var conversation = this.room(name);
      if (!conversation || conversation.isLobby()) {
        return;
      }
      if (this.get('active') === conversation.id) {
        this.select(this.lobby);
      }
      this.conversations.remove(conversation);
    },

    // Lines that arrived live in `conversation` (already added): count the
    // unread ones, unless it is being read.
    arrived: function (conversation, lines) {
      if (conversation.id === this.get('active') && !this.get('directory')) {
        this.trigger('arrived', conversation);
        return;
      }
      if (this.summaryPosition === undefined) {
        return; // counted when the summary comes
      }
      var me = this.get('me');
      var summaryPosition = this.summaryPosition;
      var fresh = _.filter(lines, function (line) {
        return line.position > summaryPosition && conversation.countsAsUnread(line, me);
      }).length;
      if (fresh) {
        conversation.set('unread', conversation.get('unread') + fresh);
      }
    },

    // The server's `conversations` summary (after each login and resume).
    applySummary: function (summary) {
      var position = toPosition(summary.position);
      if (position === undefined) {
        return;
      }
      this.summaryPosition = position;
      var me = this.get('me');
      var active = this.get('directory') ? null : this.get('active');
      var listed = {};
      var take = function (conversation, entry) {
        listed[conversation.id] = true;
        var readPosition = toPosition(entry.readPosition) || 0;
        var unread = conversation.id === active ? 0
          : Math.max(0, toPosition(entry.unread) || 0) + conversation.unreadAfter(position, me);
        var lastPosition = toPosition(entry.lastPosition) || 0;
        conversation.set({
          unread: unread,
          lastPosition: lastPosition,
          activity: Math.max(conversation.get('activity'), lastPosition),
          readSent: Math.max(conversation.get('readSent'), readPosition)
        });
      };
      _.each(_.isArray(summary.rooms) ? summary.rooms : [], function (entry) {
        if (_.isObject(entry) && typeof entry.room === 'string') {
          take(this.ensureRoom(entry.room, { topic: String(entry.topic || '') }), entry);
        }
      }, this);
      _.each(_.isArray(summary['private']) ? summary['private'] : [], function (entry) {
        if (_.isObject(entry) && typeof entry['with'] === 'string') {
          take(this.ensurePrivate(entry['with'], { peerOnline: !!entry.online }), entry);
        }
      }, this);
      // Rooms left meanwhile (not ones joined after the summary was made);
      // collected first, as dropping changes the collection.
      var gone = this.conversations.filter(function (conversation) {
        return conversation.get('kind') === 'room' && !listed[conversation.id] &&
          conversation.get('joinedPosition') <= position;
      });
      _.each(gone, function (conversation) { this.dropRoom(conversation.get('name')); }, this);
      var shown = this.activeConversation();
      if (shown.id === active) {
        this.trigger('arrived', shown);
      }
    },

    // Live room and private events ---------------------------------------

    roomEvent: function (kind, data) {
      var position = toPosition(data.position);
      this.seen(position);
      var name = String(data.room);
      var me = this.get('me');
      var who = String(kind === 'chat' ? data.sender : (kind === 'created' ? data.creator : data.name));
      if (kind === 'leave' && who === me) {
        this.dropRoom(name);
        return;
      }
      var conversation = this.room(name);
      if (!conversation && (kind === 'chat' || who === me)) {
        // Our own create or join (from its live event, maybe before the ack),
        // or a chat of a room we are in but did not know of yet.
        conversation = this.ensureRoom(name, kind === 'created' ? { topic: String(data.topic || '') } : null);
      }
      if (!conversation || conversation.isLobby()) {
        return;
      }
      if (who === me && (kind === 'join' || kind === 'created') && position !== undefined) {
        conversation.set('joinedPosition', Math.max(conversation.get('joinedPosition'), position));
      }
      var line = { kind: kind, time: data.time || null, position: position };
      if (kind === 'chat') {
        _.extend(line, { sender: who, message: String(data.message), attachments: models.attachmentsOf(data.attachments) });
      } else {
        _.extend(line, { name: who, message: kind === 'created' ? String(data.topic || '') : '' });
      }
      if (conversation.membersLoaded && kind === 'join') {
        conversation.members.add({ name: who, online: true }, { merge: true });
      } else if (conversation.membersLoaded && kind === 'leave') {
        conversation.members.remove(who);
      }
      this.arrived(conversation, conversation.addLines([line]));
    },

    privateMessage: function (data) {
      var position = toPosition(data.position);
      this.seen(position);
      var me = this.get('me');
      var sender = String(data.sender);
      var peer = sender === me ? String(data.recipient) : sender;
      var conversation = this.ensurePrivate(peer);
      var line = {
        kind: 'chat', sender: sender, message: String(data.message),
        attachments: models.attachmentsOf(data.attachments), time: data.time || null, position: position
      };
      this.arrived(conversation, conversation.addLines([line]));
    },

    // Presence is global: a room member or a PM peer is online when they
    // are in the lobby's online users.
    presence: function (name, online) {
      this.conversations.each(function (conversation) {
        var member = conversation.members.get(name);
        if (member) {
          member.set('online', online);
        }
        if (conversation.get('kind') === 'private' && conversation.get('name') === name) {
          conversation.set('peerOnline', online);
        }
      });
    },

    // A re-login that was not a resume: nothing missed is replayed, so rooms
    // and PMs load their history again.
    forgetConversations: function () {
      this.conversations.each(function (conversation) {
        if (!conversation.isLobby()) {
          conversation.forget();
        }
      });
    }
  });

  var LOBBY_KEY = 'room:lobby';

  function roomKey(name) {
    return 'room:' + String(name).toLowerCase();
  }

  function privateKey(peer) {
    return 'dm:' + peer;
  }

  function toPosition(value) {
    return typeof value === 'number' && isFinite(value) ? value : undefined;
  }

  // Well-formed history items, oldest first.
  function itemsOf(history) {
    var items = history && _.isArray(history.items) ? history.items : [];
    return _.sortBy(_.filter(items, function (item) {
      return item && toPosition(item.position) !== undefined &&
        (item.kind === 'chat' || item.kind === 'join' || item.kind === 'leave');
    }), 'position');
  }

  function lineFromItem(item) {
    if (item.kind === 'chat') {
      return {
        kind: 'chat', sender: String(item.sender), message: String(item.message),
        attachments: models.attachmentsOf(item.attachments), time: item.time || null, position: item.position
      };
    }
    return { kind: item.kind, name: String(item.name), time: item.time || null, position: item.position };
  }

  // Which screen is shown: a view instance.
  var ContainerModel = Backbone.Model.extend({
    defaults: { viewState: null }
  });

  _.extend(models, {
    LoginModel: LoginModel,
    AccountModel: AccountModel,
    ConnectionModel: ConnectionModel,
    HomeModel: HomeModel,
    ContainerModel: ContainerModel
  });
})(ChatApp, Backbone, _);
